//! Live patching of the running guest: the patch area and the `patcher::PatchTarget`
//! implementation for a live VM.

pub mod apply;
pub mod area;
pub mod boot;
pub mod live;
