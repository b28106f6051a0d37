//! Op checks of the training losses (family `loss`), run by the same harness as the network
//! ops ([`architectures::doctor`]): f32 on the device against f64 (CPU) or the CPU (CUDA),
//! gradient of the logits included.

use crate::loss::{
    bce_with_logits, cross_entropy, DcAndBceLoss, DcAndCeLoss, LossOptions, SegLoss, SoftDiceLoss,
};
use architectures::doctor::{host_uniform, OpCheck};
use candle_core::{Result, Tensor};

/// Deterministic integer labels in `0..classes` (as floats) of `shape`, on `like`'s device and
/// in its dtype.
fn labels(shape: &[usize], classes: usize, like: &Tensor) -> Result<Tensor> {
    let u = host_uniform(shape, 7)?; // [-1, 1)
    let l = ((u + 1.0)? * (classes as f64 / 2.0))?
        .floor()?
        .clamp(0f32, (classes - 1) as f32)?;
    l.to_dtype(like.dtype())?.to_device(like.device())
}

/// `(B, 1, *spatial)` labels for logits `x` with `classes` label values.
fn label_target(x: &Tensor, classes: usize) -> Result<Tensor> {
    let mut s = x.dims().to_vec();
    s[1] = 1;
    labels(&s, classes, x)
}

/// The losses nnseg trains with, 2D and 3D.
pub fn loss_checks() -> Vec<OpCheck> {
    let check = |name: &str, x: &[usize], f: fn(&Tensor) -> Result<Tensor>| {
        OpCheck::new("loss", name, x, vec![], move |x, _, _| f(x))
    };
    vec![
        check("DC+CE, batch dice 3d", &[2, 3, 3, 4, 5], |x| {
            let o = LossOptions {
                batch_dice: true,
                ..LossOptions::default()
            };
            DcAndCeLoss::new(o).loss(x, &label_target(x, 3)?)
        }),
        check("DC+CE, ignore label 2d", &[2, 3, 6, 5], |x| {
            let o = LossOptions {
                ignore_label: Some(3),
                ..LossOptions::default()
            };
            DcAndCeLoss::new(o).loss(x, &label_target(x, 4)?)
        }),
        check("DC+BCE, regions 3d", &[2, 2, 3, 4, 5], |x| {
            DcAndBceLoss::new(LossOptions::default()).loss(x, &labels(x.dims(), 2, x)?)
        }),
        check("cross entropy 2d", &[2, 4, 5, 6], |x| {
            cross_entropy(x, &label_target(x, 4)?, None)
        }),
        check(
            "soft dice (softmax, no background) 2d",
            &[2, 3, 5, 6],
            |x| SoftDiceLoss::nnunet_labels(false).forward(x, &label_target(x, 3)?, None),
        ),
        check("BCE with logits", &[2, 3, 4, 5], |x| {
            bce_with_logits(x, &labels(x.dims(), 2, x)?)
        }),
    ]
}
