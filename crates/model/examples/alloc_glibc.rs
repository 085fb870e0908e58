#![allow(clippy::print_stdout)]
include!("alloc_common.rs");
fn main() { run("glibc").unwrap() }
