//! The process's allocator: mimalloc for everything below [`LARGE`], and large buffers (tensor
//! storages of 3D training) mapped straight from the OS, with a cache that hands a freed buffer
//! back to the next request of the same mapped size, or moved into the head of a longer one.
//!
//! Why: a training step allocates and frees the same large buffers every iteration. mimalloc
//! with purging off (see `RUNTIME_ENV` in `main.rs`) keeps every freed large block committed and
//! reuses it only for requests that fit the same arena span, so at nnU-Net's 48×192×160 plan
//! its resident set grew to 10.5 GB for 8.6 GB of live data. Purging instead makes every step
//! page-fault its buffers in again. Here the large buffers are cached by exact size, and the
//! cache is bounded so that live + cached large bytes never exceed the highest live large
//! bytes seen so far: the resident set stays at the live peak, and a training loop's repeated
//! shapes find their buffers without a page fault. A request no cached buffer fits reuses the
//! pages of the longest shorter one (`mremap`), so only the difference is faulted in and zeroed
//! by the kernel (at the 2D nuclei plan: 67 instead of 136 page faults per step). Cached
//! buffers unused for [`MAX_IDLE`] are returned to the OS.

use std::alloc::{GlobalAlloc, Layout};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests of at least this many bytes are mapped directly.
pub const LARGE: usize = 4 << 20;
/// Mapped sizes are multiples of this (and aligned to it), so transparent huge pages can back
/// them and near sizes share cache entries.
const GRANULE: usize = 2 << 20;
/// At most this many freed buffers are cached.
const SLOTS: usize = 256;
/// A cached buffer not reused for this long is unmapped.
const MAX_IDLE: Duration = Duration::from_secs(60);

pub struct NnsegAlloc;

#[derive(Clone, Copy)]
struct Slot {
    len: usize,
    addr: usize,
    freed: Instant,
}

struct Cache {
    slots: [Option<Slot>; SLOTS],
    /// Mapped bytes handed out and not yet freed.
    live: usize,
    /// Mapped bytes sitting in `slots`.
    cached: usize,
    /// The highest `live` so far.
    peak: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    slots: [None; SLOTS],
    live: 0,
    cached: 0,
    peak: 0,
});

fn mapped_len(size: usize) -> usize {
    size.div_ceil(GRANULE) * GRANULE
}

/// Maps `len` bytes (a multiple of [`GRANULE`]) aligned to [`GRANULE`]; null on failure.
fn map(len: usize) -> *mut u8 {
    let total = len + GRANULE;
    // SAFETY: an anonymous private mapping; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let base = base as usize;
    let start = base.div_ceil(GRANULE) * GRANULE;
    // SAFETY: head and tail lie inside the mapping just made and outside [start, start + len).
    unsafe {
        if start > base {
            libc::munmap(base as *mut libc::c_void, start - base);
        }
        let tail = base + total - (start + len);
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        // Best effort: without transparent huge pages the mapping still works.
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    start as *mut u8
}

fn unmap(addr: usize, len: usize) {
    // SAFETY: `addr..addr + len` is a mapping made by `map` that nobody references any more.
    unsafe {
        libc::munmap(addr as *mut libc::c_void, len);
    }
}

/// Moves the pages of cached buffer `h` to `dst` (the head of a mapping at least `h.len`
/// long), so they need not be faulted in and zeroed again; on failure `h` is unmapped and the
/// destination keeps its fresh zero pages. Returns whether the pages moved.
#[cfg(target_os = "linux")]
fn move_into(h: Slot, dst: usize) -> bool {
    // SAFETY: `h` is a mapping of ours that nobody references; `dst..dst + h.len` lies inside
    // a mapping just made by `map`, which MREMAP_FIXED replaces.
    let r = unsafe {
        libc::mremap(
            h.addr as *mut libc::c_void,
            h.len,
            h.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst as *mut libc::c_void,
        )
    };
    if r == libc::MAP_FAILED {
        unmap(h.addr, h.len);
        return false;
    }
    true
}

#[cfg(not(target_os = "linux"))]
fn move_into(h: Slot, _dst: usize) -> bool {
    unmap(h.addr, h.len);
    false
}

impl Cache {
    /// Takes the cached buffer in slot `i` out of the cache.
    fn take_slot(&mut self, i: usize) -> Option<Slot> {
        let slot = self.slots[i].take()?;
        self.cached -= slot.len;
        Some(slot)
    }

    /// The slot of the cached buffer `pick` prefers among those whose length passes `keep`.
    fn find(
        &self,
        keep: impl Fn(usize) -> bool,
        pick: impl Fn(usize, usize) -> bool,
    ) -> Option<usize> {
        let mut best: Option<(usize, usize)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(s) = s {
                if keep(s.len) && best.is_none_or(|(_, b)| pick(s.len, b)) {
                    best = Some((i, s.len));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// A cached buffer of exactly `len` bytes, if any. Longer ones are left for the requests
    /// of their own size: in a training loop those come again.
    fn take(&mut self, len: usize) -> Option<usize> {
        let i = self.find(|l| l == len, |_, _| false)?;
        self.take_slot(i).map(|s| s.addr)
    }

    /// Unmaps cached buffers (largest first) until `need` more live bytes fit under the peak,
    /// and those idle for longer than [`MAX_IDLE`].
    fn evict(&mut self, need: usize, now: Instant) {
        for s in self.slots.iter_mut() {
            if let Some(slot) = *s {
                if now.duration_since(slot.freed) > MAX_IDLE {
                    unmap(slot.addr, slot.len);
                    self.cached -= slot.len;
                    *s = None;
                }
            }
        }
        let bound = self.peak.max(self.live + need);
        while self.cached > 0 && self.live + self.cached + need > bound {
            let Some(i) = (0..SLOTS)
                .filter(|&i| self.slots[i].is_some())
                .max_by_key(|&i| self.slots[i].map_or(0, |s| s.len))
            else {
                break;
            };
            if let Some(slot) = self.slots[i].take() {
                unmap(slot.addr, slot.len);
                self.cached -= slot.len;
            }
        }
    }

    /// A buffer of `len` mapped bytes: a cached one if one is long enough; else a fresh mapping
    /// (which the OS hands out zeroed), into whose head the longest shorter cached buffer is
    /// moved, so only the difference is page-faulted in. Returns the address and whether every
    /// byte of it is fresh.
    fn alloc(&mut self, len: usize) -> Option<(usize, bool)> {
        let now = Instant::now();
        let (addr, fresh) = match self.take(len) {
            Some(addr) => (addr, false),
            None => {
                let head = self
                    .find(|l| l < len, |a, b| a > b)
                    .and_then(|i| self.take_slot(i));
                // `head` already left `cached`: its pages count within the new `len`
                self.evict(len, now);
                let p = map(len);
                if p.is_null() {
                    if let Some(h) = head {
                        unmap(h.addr, h.len);
                    }
                    return None;
                }
                let moved = head.is_some_and(|h| move_into(h, p as usize));
                (p as usize, !moved)
            }
        };
        self.live += len;
        self.peak = self.peak.max(self.live);
        Some((addr, fresh))
    }

    /// Takes back a buffer: cached when live + cached stays within the peak, else unmapped.
    fn free(&mut self, addr: usize, len: usize) {
        self.live -= len;
        let now = Instant::now();
        self.evict(0, now);
        let free_slot = self.slots.iter().position(Option::is_none);
        match free_slot {
            Some(i) if self.live + self.cached + len <= self.peak => {
                self.slots[i] = Some(Slot {
                    len,
                    addr,
                    freed: now,
                });
                self.cached += len;
            }
            _ => unmap(addr, len),
        }
    }
}

fn cache() -> std::sync::MutexGuard<'static, Cache> {
    // The cache's counters stay consistent under a panic elsewhere: nothing panics while the
    // lock is held.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

fn is_large(layout: &Layout) -> bool {
    layout.size() >= LARGE && layout.align() <= GRANULE
}

fn large_alloc(layout: Layout, zeroed: bool) -> *mut u8 {
    let len = mapped_len(layout.size());
    match cache().alloc(len) {
        Some((addr, fresh)) => {
            if zeroed && !fresh {
                // SAFETY: `addr` starts `len >= layout.size()` writable bytes owned by us.
                unsafe { std::ptr::write_bytes(addr as *mut u8, 0, layout.size()) };
            }
            addr as *mut u8
        }
        None => std::ptr::null_mut(),
    }
}

// SAFETY: large blocks come from `map` (aligned to GRANULE >= layout.align()) and go back only
// through `dealloc` with the same layout, so `mapped_len` finds the same length; everything
// else is mimalloc's.
unsafe impl GlobalAlloc for NnsegAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            large_alloc(layout, false)
        } else {
            mimalloc::MiMalloc.alloc(layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if is_large(&layout) {
            large_alloc(layout, true)
        } else {
            mimalloc::MiMalloc.alloc_zeroed(layout)
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if is_large(&layout) {
            cache().free(ptr as usize, mapped_len(layout.size()));
        } else {
            mimalloc::MiMalloc.dealloc(ptr, layout)
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = Layout::from_size_align_unchecked(new_size, layout.align());
        if !is_large(&layout) && !is_large(&new) {
            return mimalloc::MiMalloc.realloc(ptr, layout, new_size);
        }
        let p = self.alloc(new);
        if !p.is_null() {
            std::ptr::copy_nonoverlapping(ptr, p, layout.size().min(new_size));
            self.dealloc(ptr, layout);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh_cache() -> Cache {
        Cache {
            slots: [None; SLOTS],
            live: 0,
            cached: 0,
            peak: 0,
        }
    }

    #[test]
    fn a_freed_buffer_is_reused_for_the_same_size_and_zeroed_on_request() {
        let mut c = fresh_cache();
        let len = mapped_len(5 << 20);
        assert_eq!(len, 6 << 20);
        let (a, fresh) = c.alloc(len).unwrap();
        assert!(fresh);
        assert_eq!(a % GRANULE, 0);
        // SAFETY: `a` is a fresh writable mapping of `len` bytes.
        unsafe { std::ptr::write_bytes(a as *mut u8, 7, len) };
        c.free(a, len);
        assert_eq!((c.live, c.cached, c.peak), (0, len, len));
        let (b, fresh) = c.alloc(len).unwrap();
        assert_eq!(
            (b, fresh),
            (a, false),
            "same size: the cached buffer comes back"
        );
        c.free(b, len);
        // a shorter request leaves it for its own size and, to stay within the peak, evicts it
        let short = mapped_len(3 << 20);
        let (d, fresh) = c.alloc(short).unwrap();
        assert!(fresh);
        assert_ne!(d, a);
        assert_eq!(c.cached, 0);
        c.free(d, short);
        assert!(c.live + c.cached <= c.peak);
    }

    #[test]
    fn a_longer_request_reuses_the_pages_of_a_shorter_cached_buffer() {
        let mut c = fresh_cache();
        let (short, long) = (mapped_len(4 << 20), mapped_len(10 << 20));
        // a peak high enough for both to be live at once
        let (p, _) = c.alloc(long).unwrap();
        let (a, _) = c.alloc(short).unwrap();
        c.free(p, long);
        // SAFETY: `a` is a writable mapping of `short` bytes.
        unsafe { std::ptr::write_bytes(a as *mut u8, 7, short) };
        c.free(a, short);
        let (_, _) = c.alloc(long).unwrap(); // takes `p` back exactly
        let (b, fresh) = c.alloc(long).unwrap();
        assert!(c.live + c.cached <= c.peak);
        assert_eq!(c.cached, 0, "the short buffer left the cache");
        // SAFETY: `b` is a mapping of `long` bytes of ours.
        let bytes = unsafe { std::slice::from_raw_parts(b as *const u8, long) };
        if cfg!(target_os = "linux") {
            assert!(!fresh, "moved pages are not fresh");
            assert!(
                bytes[..short].iter().all(|&x| x == 7),
                "the head is the old buffer"
            );
        }
        assert!(
            bytes[short..].iter().all(|&x| x == 0),
            "the rest is zero pages"
        );
    }

    #[test]
    fn live_plus_cached_never_exceeds_the_live_peak() {
        let mut c = fresh_cache();
        let sizes = [4usize, 6, 8, 4, 10, 6].map(|m| mapped_len(m << 20));
        // "iteration" 1 sets the peak; later ones allocate the same sizes in another order
        let mut peak_seen = 0;
        for round in 0..3 {
            let mut held = vec![];
            let order: Vec<usize> = if round % 2 == 0 {
                (0..sizes.len()).collect()
            } else {
                (0..sizes.len()).rev().collect()
            };
            for &i in &order {
                held.push((c.alloc(sizes[i]).unwrap().0, sizes[i]));
                peak_seen = peak_seen.max(c.live);
                assert!(c.live + c.cached <= c.peak.max(c.live));
            }
            for (a, len) in held {
                c.free(a, len);
                assert!(c.live + c.cached <= c.peak);
            }
        }
        assert_eq!(c.peak, peak_seen);
        assert_eq!(c.live, 0);
    }

    #[test]
    fn the_global_allocator_round_trips_large_and_small_blocks() {
        let a = NnsegAlloc;
        for size in [64usize, LARGE - 1, LARGE, 3 * LARGE + 5] {
            let l = Layout::from_size_align(size, 8).unwrap();
            // SAFETY: plain alloc / write / dealloc with one layout.
            unsafe {
                let p = a.alloc_zeroed(l);
                assert!(!p.is_null());
                assert!(std::slice::from_raw_parts(p, size).iter().all(|&b| b == 0));
                std::ptr::write_bytes(p, 1, size);
                let q = a.realloc(p, l, size * 2);
                assert!(!q.is_null());
                assert!(std::slice::from_raw_parts(q, size).iter().all(|&b| b == 1));
                a.dealloc(q, Layout::from_size_align(size * 2, 8).unwrap());
            }
        }
    }
}
