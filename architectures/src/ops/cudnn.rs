//! cuDNN convolutions for CUDA tensors (cargo feature `cudnn`).
//!
//! [`super::conv`], [`super::conv_transpose`], [`super::conv_weight_grad`] and
//! [`super::conv_input_grad`] run the same three custom ops on CUDA as on CPU (`ConvFwdOp`,
//! `ConvDataOp`, `ConvFilterOp` in `conv.rs`), so the forward pass, both gradients and double
//! backward all go through cuDNN's N-d convolution API (cuDNN 9 via cudarc 0.19's safe
//! wrappers):
//!
//! * convolution forward = `cudnnConvolutionForward`,
//! * input gradient and transposed convolution = `cudnnConvolutionBackwardData` (the transposed
//!   conv's weight `(C_in, C_out/g, *k)` is read as the weight of the conv it is the adjoint of),
//! * weight gradient = `cudnnConvolutionBackwardFilter`.
//!
//! 1D (as 2D with a unit axis), 2D and 3D; per-axis stride / padding / dilation; groups; f32, f16
//! and bf16 storage with f32 accumulation (f64 and other dtypes use the composite path). Bias is
//! added by `conv.rs` with Candle's `broadcast_add`, so its gradient is Candle's reduction.
//! f32 runs with `CUDNN_FMA_MATH` (no TF32), so results match the CPU kernels to f32 rounding;
//! [`set_cudnn_allow_tf32`] switches to `CUDNN_DEFAULT_MATH`, which lets Ampere-or-newer GPUs use
//! TF32 tensor cores (about 1e-3 relative error). f16/bf16 use `CUDNN_TENSOR_OP_MATH`; on a GPU
//! where cuDNN has no kernel for them (bf16 needs Ampere or newer) the op returns cuDNN's error
//! rather than falling back.
//!
//! Handles are created per thread and Candle device (a cuDNN handle is neither `Send` nor `Sync`)
//! on the device's stream, so cuDNN work is ordered with Candle's kernels. The algorithm of each
//! (device, dtype, math mode, geometry) is chosen once with cuDNN's heuristics
//! (`cudnnGetConvolution*Algorithm_v7`; cudarc's safe API has no `cudnnFind*` benchmarking) and
//! cached; when the heuristic's choice is unsupported or wants more than [`CUDNN_MAX_WORKSPACE`]
//! bytes of workspace, implicit-GEMM style algorithms are tried instead. Workspace and outputs are
//! allocated on the stream (stream-ordered allocator).
//!
//! Linking: Candle enables cudarc's `dynamic-linking`, and cudarc refuses `dynamic-loading` next to
//! it, so a `cudnn` build has `libcudnn.so.9` as a link-time and load-time dependency (hence the
//! separate feature: a plain `cuda` build does not need cuDNN). At run time, the first use on a
//! device creates a handle and runs a tiny probe convolution; if either fails (no usable GPU, a
//! missing cuDNN sub-library, a cuDNN/driver mismatch), a warning is logged once through `tracing`
//! and every convolution takes the composite Candle path from then on ([`cudnn_available`] tells
//! why).
//!
//! Status: written and type-checked without a GPU (`scripts/check_cuda.sh --features cudnn`);
//! nothing here has been run on a GPU yet. `ops/cuda_tests.rs` holds the GPU tests that compare it
//! with the CPU kernels.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
use candle_core::{bail, CudaStorage, DType, Device, Error, Layout, Result, Tensor, WithDType};
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as DataAlgo, cudnnConvolutionBwdFilterAlgo_t as FilterAlgo,
    cudnnConvolutionFwdAlgo_t as FwdAlgo, cudnnConvolutionMode_t, cudnnMathType_t,
    cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn, CudnnDataType,
    CudnnError, FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr};

/// Largest workspace (bytes) an algorithm may ask for before a leaner one is used instead.
pub const CUDNN_MAX_WORKSPACE: usize = 1 << 30;

static ALLOW_TF32: AtomicBool = AtomicBool::new(false);

/// Lets f32 cuDNN convolutions use TF32 tensor cores (`CUDNN_DEFAULT_MATH`; faster on Ampere and
/// newer, ~1e-3 relative error). Off by default (`CUDNN_FMA_MATH`: plain f32 FMA kernels).
pub fn set_cudnn_allow_tf32(allow: bool) {
    ALLOW_TF32.store(allow, Ordering::Relaxed);
}

/// Whether f32 cuDNN convolutions may use TF32, see [`set_cudnn_allow_tf32`].
pub fn cudnn_allow_tf32() -> bool {
    ALLOW_TF32.load(Ordering::Relaxed)
}

/// Set (with a one-time warning) when cuDNN could not be initialised; the composite path is used
/// from then on.
static UNUSABLE: OnceLock<String> = OnceLock::new();

/// `Ok` when convolutions on `device` run on cuDNN; otherwise the reason (CPU device, or cuDNN
/// failed to initialise on this machine). Initialises cuDNN for the device on first use.
pub fn cudnn_available(device: &Device) -> Result<()> {
    match device {
        Device::Cuda(dev) => handle(dev).map(|_| ()),
        other => bail!(
            "cuDNN convolutions need a CUDA device, got {:?}",
            other.location()
        ),
    }
}

/// Whether [`super::conv`] & co. should take the cuDNN path for `t`.
pub(crate) fn usable(t: &Tensor) -> bool {
    match t.device() {
        Device::Cuda(dev) if matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) => {
            handle(dev).is_ok()
        }
        _ => false,
    }
}

/// Geometry of a convolution `x (n, cin, *inp) * w (cout, cin/groups, *k) -> y (n, cout, *out)`,
/// one entry per spatial axis (1 to 3) in each list.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ConvGeom {
    pub n: usize,
    pub cin: usize,
    pub cout: usize,
    pub groups: usize,
    pub inp: Vec<usize>,
    pub out: Vec<usize>,
    pub k: Vec<usize>,
    pub s: Vec<usize>,
    pub p: Vec<usize>,
    pub d: Vec<usize>,
}

impl ConvGeom {
    fn x_dims(&self) -> Vec<usize> {
        [&[self.n, self.cin][..], &self.inp].concat()
    }
    fn y_dims(&self) -> Vec<usize> {
        [&[self.n, self.cout][..], &self.out].concat()
    }
    fn w_dims(&self) -> Vec<usize> {
        [&[self.cout, self.cin / self.groups][..], &self.k].concat()
    }
}

/// Convolution forward: `x (n, cin, *inp)`, `w (cout, cin/g, *k)` -> `y (n, cout, *out)`.
pub(crate) fn conv_fwd(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => fwd::<f32>(x, xl, w, wl, g),
        DType::F16 => fwd::<half::f16>(x, xl, w, wl, g),
        DType::BF16 => fwd::<half::bf16>(x, xl, w, wl, g),
        other => bail!("cuDNN conv: unsupported dtype {other:?}"),
    }
}

/// Convolution input gradient (= transposed convolution): `dy (n, cout, *out)`,
/// `w (cout, cin/g, *k)` -> `dx (n, cin, *inp)`.
pub(crate) fn conv_bwd_data(
    dy: &CudaStorage,
    dyl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    match dy.dtype() {
        DType::F32 => bwd_data::<f32>(dy, dyl, w, wl, g),
        DType::F16 => bwd_data::<half::f16>(dy, dyl, w, wl, g),
        DType::BF16 => bwd_data::<half::bf16>(dy, dyl, w, wl, g),
        other => bail!("cuDNN conv_transpose: unsupported dtype {other:?}"),
    }
}

/// Convolution weight gradient: `x (n, cin, *inp)`, `dy (n, cout, *out)` -> `dw (cout, cin/g, *k)`.
pub(crate) fn conv_bwd_filter(
    x: &CudaStorage,
    xl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    match x.dtype() {
        DType::F32 => bwd_filter::<f32>(x, xl, dy, dyl, g),
        DType::F16 => bwd_filter::<half::f16>(x, xl, dy, dyl, g),
        DType::BF16 => bwd_filter::<half::bf16>(x, xl, dy, dyl, g),
        other => bail!("cuDNN conv weight grad: unsupported dtype {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// implementation

/// Storage element types cuDNN handles here (f32 compute for all of them).
trait Elem: WithDType + CudaDType + CudnnDataType + DeviceRepr {}
impl Elem for f32 {}
impl Elem for half::f16 {}
impl Elem for half::bf16 {}

fn cudnn_err(what: &'static str) -> impl FnOnce(CudnnError) -> Error {
    move |e| Error::Cuda(format!("cuDNN {what}: {e:?}").into())
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    dev: DeviceId,
    dtype: DType,
    math: u32,
    geom: ConvGeom,
}

#[derive(Default)]
struct State {
    handles: HashMap<DeviceId, Arc<Cudnn>>,
    fwd: HashMap<Key, (FwdAlgo, usize)>,
    data: HashMap<Key, (DataAlgo, usize)>,
    filter: HashMap<Key, (FilterAlgo, usize)>,
}

thread_local! {
    // cudarc's `Cudnn` is neither Send nor Sync (nor are descriptors, which hold an Arc of it).
    static STATE: RefCell<State> = RefCell::new(State::default());
}

/// The calling thread's cuDNN handle for `dev` (bound to the device's stream), created and probed
/// on first use. After a failure cuDNN is disabled for the process (one warning).
fn handle(dev: &CudaDevice) -> Result<Arc<Cudnn>> {
    if let Some(why) = UNUSABLE.get() {
        bail!("cuDNN is disabled for this process: {why}");
    }
    let id = dev.id();
    if let Some(h) = STATE.with(|s| s.borrow().handles.get(&id).cloned()) {
        return Ok(h);
    }
    // no RefCell borrow is held here: the probe below uses the algorithm caches
    let res = Cudnn::new(dev.cuda_stream())
        .map_err(cudnn_err("cudnnCreate"))
        .and_then(|h| probe(&h, dev).map(|_| h));
    match res {
        Ok(h) => {
            STATE.with(|s| s.borrow_mut().handles.insert(id, h.clone()));
            Ok(h)
        }
        Err(e) => {
            let why = UNUSABLE.get_or_init(|| {
                let why = format!("{e}");
                tracing::warn!(
                    "cuDNN unavailable ({why}); convolutions fall back to the slower composite \
                     Candle path"
                );
                why
            });
            bail!("cuDNN is disabled for this process: {why}")
        }
    }
}

/// A 1x1x4x4 (*) 1x1x3x3 convolution through the real path: loads cuDNN's engine sub-libraries
/// and runs the heuristics, so a broken install shows up here rather than mid-training.
fn probe(h: &Arc<Cudnn>, dev: &CudaDevice) -> Result<()> {
    let g = ConvGeom {
        n: 1,
        cin: 1,
        cout: 1,
        groups: 1,
        inp: vec![4, 4],
        out: vec![2, 2],
        k: vec![3, 3],
        s: vec![1, 1],
        p: vec![0, 0],
        d: vec![1, 1],
    };
    let x = dev.alloc_zeros::<f32>(16)?;
    let w = dev.alloc_zeros::<f32>(9)?;
    let y = fwd_slices::<f32>(h, dev, &x.slice(..), &w.slice(..), &g)?;
    dev.cuda_stream()
        .synchronize()
        .map_err(|e| Error::Cuda(format!("cuDNN probe: {e:?}").into()))?;
    drop(y);
    Ok(())
}

/// cuDNN wants at least 2 spatial axes: 1D runs as 2D with a trailing unit axis.
fn spatial(v: &[usize], fill: usize) -> Vec<usize> {
    let mut r = v.to_vec();
    if r.len() < 2 {
        r.push(fill);
    }
    r
}

fn to_c_int(v: &[usize], what: &str) -> Result<Vec<i32>> {
    v.iter()
        .map(|&x| {
            i32::try_from(x).map_err(|_| Error::Msg(format!("cuDNN {what}: {v:?} exceeds i32")))
        })
        .collect()
}

/// Dims and packed (row-major) strides of a contiguous tensor; cuDNN takes 32-bit ints, so the
/// element count must fit in i32.
fn packed(dims: &[usize], what: &str) -> Result<(Vec<i32>, Vec<i32>)> {
    let numel: usize = dims.iter().product();
    if numel == 0 || numel > i32::MAX as usize {
        bail!("cuDNN {what}: tensor {dims:?} has {numel} elements (cuDNN needs 1..=2^31-1)");
    }
    let mut strides = vec![1usize; dims.len()];
    for i in (0..dims.len() - 1).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    Ok((to_c_int(dims, what)?, to_c_int(&strides, what)?))
}

fn math_type<T: Elem>() -> cudnnMathType_t {
    match T::DTYPE {
        DType::F32 if cudnn_allow_tf32() => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        DType::F32 => cudnnMathType_t::CUDNN_FMA_MATH,
        _ => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// Tensor, filter and convolution descriptors of one geometry (rank 4 for 1D/2D, 5 for 3D).
struct Descs<T: Elem> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
}

impl<T: Elem> Descs<T> {
    fn new(h: &Arc<Cudnn>, g: &ConvGeom) -> Result<Self> {
        let fix = |v: &[usize]| [&v[..2], &spatial(&v[2..], 1)[..]].concat();
        let (xd, xs) = packed(&fix(&g.x_dims()), "input")?;
        let (yd, ys) = packed(&fix(&g.y_dims()), "output")?;
        let (wd, _) = packed(&fix(&g.w_dims()), "weight")?;
        let pad = to_c_int(&spatial(&g.p, 0), "padding")?;
        let stride = to_c_int(&spatial(&g.s, 1), "stride")?;
        let dil = to_c_int(&spatial(&g.d, 1), "dilation")?;
        let x = h
            .create_nd_tensor::<T>(&xd, &xs)
            .map_err(cudnn_err("input descriptor"))?;
        let y = h
            .create_nd_tensor::<T>(&yd, &ys)
            .map_err(cudnn_err("output descriptor"))?;
        let w = h
            .create_nd_filter::<T>(cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, &wd)
            .map_err(cudnn_err("filter descriptor"))?;
        // compute type f32 for f32, f16 ("pseudo half") and bf16 storage
        let mut conv = h
            .create_convnd::<f32>(
                &pad,
                &stride,
                &dil,
                cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            )
            .map_err(cudnn_err("convolution descriptor"))?;
        conv.set_math_type(math_type::<T>())
            .map_err(cudnn_err("math type"))?;
        if g.groups > 1 {
            let groups = to_c_int(&[g.groups], "groups")?[0];
            conv.set_group_count(groups)
                .map_err(cudnn_err("group count"))?;
        }
        Ok(Self { x, w, y, conv })
    }
}

fn key<T: Elem>(dev: &CudaDevice, g: &ConvGeom) -> Key {
    Key {
        dev: dev.id(),
        dtype: T::DTYPE,
        math: math_type::<T>() as u32,
        geom: g.clone(),
    }
}

/// The cached algorithm for `key`, or the first of the heuristic's pick and `fallbacks` whose
/// workspace query succeeds within [`CUDNN_MAX_WORKSPACE`] (then cached).
fn algo<A: Copy + std::fmt::Debug>(
    cache: fn(&mut State) -> &mut HashMap<Key, (A, usize)>,
    key: Key,
    picked: impl FnOnce() -> std::result::Result<A, CudnnError>,
    fallbacks: &[A],
    workspace: impl Fn(A) -> std::result::Result<usize, CudnnError>,
    what: &str,
) -> Result<(A, usize)> {
    if let Some(hit) = STATE.with(|s| cache(&mut s.borrow_mut()).get(&key).copied()) {
        return Ok(hit);
    }
    let mut tried = Vec::new();
    let first = match picked() {
        Ok(a) => Some(a),
        Err(e) => {
            tried.push(format!("heuristic: {e:?}"));
            None
        }
    };
    for a in first.into_iter().chain(fallbacks.iter().copied()) {
        match workspace(a) {
            Ok(n) if n <= CUDNN_MAX_WORKSPACE => {
                STATE.with(|s| cache(&mut s.borrow_mut()).insert(key, (a, n)));
                return Ok((a, n));
            }
            Ok(n) => tried.push(format!("{a:?}: workspace {n} B")),
            Err(e) => tried.push(format!("{a:?}: {e:?}")),
        }
    }
    bail!(
        "cuDNN {what}: no usable algorithm for {:?} ({})",
        key.geom,
        tried.join("; ")
    )
}

fn workspace(dev: &CudaDevice, bytes: usize) -> Result<Option<CudaSlice<u8>>> {
    if bytes == 0 {
        return Ok(None);
    }
    // SAFETY: scratch memory; cuDNN never reads workspace bytes it has not written.
    let ws = unsafe { dev.alloc::<u8>(bytes) }?;
    Ok(Some(ws))
}

/// Uninitialised output of `len` elements.
fn output<T: Elem>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every caller passes beta = 0, and cuDNN documents that with beta = 0 the output is
    // only written, never read (it may hold any bits, NaN included, before the call).
    unsafe { dev.alloc::<T>(len) }
}

/// The contiguous part of `s` that `l` describes, as a view.
fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => bail!("cuDNN {what}: operand is not contiguous"),
    }
}

fn check_len<T>(v: &CudaView<'_, T>, dims: &[usize], what: &str) -> Result<()> {
    let want: usize = dims.iter().product();
    if v.len() != want {
        bail!(
            "cuDNN {what}: operand has {} elements, geometry {dims:?} needs {want}",
            v.len()
        );
    }
    Ok(())
}

fn scale<T: Elem>() -> (T, T) {
    (T::from_f64(1.0), T::from_f64(0.0))
}

fn fwd<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let h = handle(dev)?;
    let xv = view::<T>(x, xl, "conv")?;
    let wv = view::<T>(w, wl, "conv")?;
    let y = fwd_slices::<T>(&h, dev, &xv, &wv, g)?;
    Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
}

fn fwd_slices<T: Elem>(
    h: &Arc<Cudnn>,
    dev: &CudaDevice,
    xv: &CudaView<'_, T>,
    wv: &CudaView<'_, T>,
    g: &ConvGeom,
) -> Result<CudaSlice<T>> {
    check_len(xv, &g.x_dims(), "conv input")?;
    check_len(wv, &g.w_dims(), "conv weight")?;
    let d = Descs::<T>::new(h, g)?;
    let op = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    };
    let (a, ws) = algo(
        |s| &mut s.fwd,
        key::<T>(dev, g),
        || op.pick_algorithm(),
        &[
            FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            FwdAlgo::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        ],
        |a| op.get_workspace_size(a),
        "conv forward",
    )?;
    let mut ws = workspace(dev, ws)?;
    let mut y = output::<T>(dev, g.y_dims().iter().product())?;
    // SAFETY: x, w and y are device buffers of type T on the handle's device whose lengths match
    // the packed NCHW/NCDHW descriptors built from `g` (checked above / allocated to size), and the
    // workspace holds at least the size cuDNN asked for this algorithm.
    unsafe { op.launch(a, ws.as_mut(), scale::<T>(), xv, wv, &mut y) }
        .map_err(cudnn_err("convolution forward"))?;
    Ok(y)
}

fn bwd_data<T: Elem>(
    dy: &CudaStorage,
    dyl: &Layout,
    w: &CudaStorage,
    wl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = &dy.device;
    let h = handle(dev)?;
    let dyv = view::<T>(dy, dyl, "conv_transpose")?;
    let wv = view::<T>(w, wl, "conv_transpose")?;
    check_len(&dyv, &g.y_dims(), "conv_transpose input")?;
    check_len(&wv, &g.w_dims(), "conv_transpose weight")?;
    let d = Descs::<T>::new(&h, g)?;
    let op = ConvBackwardData {
        conv: &d.conv,
        dx: &d.x,
        w: &d.w,
        dy: &d.y,
    };
    let (a, ws) = algo(
        |s| &mut s.data,
        key::<T>(dev, g),
        || op.pick_algorithm(),
        &[
            DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
            DataAlgo::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        ],
        |a| op.get_workspace_size(a),
        "conv backward data",
    )?;
    let mut ws = workspace(dev, ws)?;
    let mut dx = output::<T>(dev, g.x_dims().iter().product())?;
    // SAFETY: as in `fwd_slices`: buffers of type T sized to the descriptors, workspace as
    // requested for this algorithm.
    unsafe { op.launch(a, ws.as_mut(), scale::<T>(), &mut dx, &wv, &dyv) }
        .map_err(cudnn_err("convolution backward data"))?;
    Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
}

fn bwd_filter<T: Elem>(
    x: &CudaStorage,
    xl: &Layout,
    dy: &CudaStorage,
    dyl: &Layout,
    g: &ConvGeom,
) -> Result<CudaStorage> {
    let dev = &x.device;
    let h = handle(dev)?;
    let xv = view::<T>(x, xl, "conv weight grad")?;
    let dyv = view::<T>(dy, dyl, "conv weight grad")?;
    check_len(&xv, &g.x_dims(), "conv weight grad input")?;
    check_len(&dyv, &g.y_dims(), "conv weight grad output gradient")?;
    let d = Descs::<T>::new(&h, g)?;
    let op = ConvBackwardFilter {
        conv: &d.conv,
        x: &d.x,
        dw: &d.w,
        dy: &d.y,
    };
    let (a, ws) = algo(
        |s| &mut s.filter,
        key::<T>(dev, g),
        || op.pick_algorithm(),
        &[
            FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            FilterAlgo::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        ],
        |a| op.get_workspace_size(a),
        "conv backward filter",
    )?;
    let mut ws = workspace(dev, ws)?;
    let mut dw = output::<T>(dev, g.w_dims().iter().product())?;
    // SAFETY: as in `fwd_slices`: buffers of type T sized to the descriptors, workspace as
    // requested for this algorithm.
    unsafe { op.launch(a, ws.as_mut(), scale::<T>(), &xv, &mut dw, &dyv) }
        .map_err(cudnn_err("convolution backward filter"))?;
    Ok(CudaStorage::wrap_cuda_slice(dw, dev.clone()))
}
