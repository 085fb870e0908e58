#![allow(clippy::print_stdout)]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
include!("alloc_common.rs");
fn main() { run("mimalloc").unwrap() }
