//! The global allocator: mimalloc, entered the way its fast paths expect.
//!
//! mimalloc's `_aligned` entry points serve a block over 1 KiB by over-allocating and aligning by
//! hand, and the `mimalloc` crate sends every Rust allocation through them. A proxied HTTP/1
//! request makes about 11 allocations, several of them buffers over 1 KiB: through the aligned
//! entry points they cost ~1,450 instructions, through plain `mi_malloc` ~500 (callgrind,
//! benches/compare/instructions.sh). So a layout that asks for no more alignment than every
//! mimalloc block has anyway goes to the plain calls, and only the rare stricter one to the
//! aligned calls.

use std::{
    alloc::{GlobalAlloc, Layout},
    ffi::c_void,
};

use libmimalloc_sys as mi;

/// The alignment of every block mimalloc hands out: its size classes are whole machine words.
const WORD: usize = std::mem::size_of::<usize>();

pub struct MiMalloc;

// SAFETY: each method forwards to the mimalloc call for the same job. mimalloc returns blocks
// valid for the requested size until freed, or null on failure, as `GlobalAlloc` requires. Every
// mimalloc block is at least `WORD`-aligned, so the plain calls satisfy layouts with
// `align <= WORD`; stricter layouts (a power of two, as `Layout` guarantees) use the `_aligned`
// calls, which honour any power-of-two alignment. `mi_free` frees blocks from either family, and
// `realloc` keeps to the family the layout's alignment selected when the block was allocated.
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        let block = unsafe {
            if layout.align() <= WORD {
                mi::mi_malloc(layout.size())
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align())
            }
        };
        block.cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        let block = unsafe {
            if layout.align() <= WORD {
                mi::mi_zalloc(layout.size())
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align())
            }
        };
        block.cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl; `ptr` came from this allocator.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; `ptr` came from this allocator with `layout`.
        let block = unsafe {
            if layout.align() <= WORD {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size)
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align())
            }
        };
        block.cast()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_honour_every_alignment_and_keep_their_bytes_across_realloc() {
        let alloc = MiMalloc;
        for align in [1, 2, 8, 16, 64, 4096] {
            for size in [1, 24, 1000, 5000, 100_000] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: non-zero size; each block is written within bounds, then freed once.
                unsafe {
                    let p = alloc.alloc(layout);
                    assert!(!p.is_null());
                    assert_eq!(p as usize % align, 0, "size {size} align {align}");
                    p.write_bytes(0xa5, size);
                    let q = alloc.realloc(p, layout, size * 2);
                    assert_eq!(q as usize % align, 0, "realloc size {size} align {align}");
                    assert!((0..size).all(|i| *q.add(i) == 0xa5));
                    alloc.dealloc(q, Layout::from_size_align(size * 2, align).unwrap());

                    let z = alloc.alloc_zeroed(layout);
                    assert_eq!(z as usize % align, 0);
                    assert!((0..size).all(|i| *z.add(i) == 0));
                    alloc.dealloc(z, layout);
                }
            }
        }
    }
}
