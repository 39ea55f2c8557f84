//! Guest kernel introspection: a pure library over two small traits (read
//! guest-physical memory; read a vCPU's registers). Work starts in issue #4.
