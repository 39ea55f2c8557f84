//! Live patching of a guest kernel from the host. Work starts in issue #5.
