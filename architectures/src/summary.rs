//! Layer table of a network for a patch size: output shapes, parameters and an activation
//! memory estimate (what `nnseg show_network DATASET CONFIG` prints).
//!
//! The network is built on shape-only tensors, so even a 100M-parameter ResEnc-XL is described
//! without allocating its weights or running a forward pass.

use crate::registry::{count_trainable, ArchError, LayerRow, NetworkIo, Registry};

/// Bytes per f32 element.
const F32: u64 = 4;

/// A network's layer table and totals.
#[derive(Debug, Clone)]
pub struct NetworkSummary {
    pub network_class_name: String,
    pub patch: Vec<usize>,
    pub batch: usize,
    pub io: NetworkIo,
    pub rows: Vec<LayerRow>,
    /// Trainable parameters (PyTorch's count, every head included).
    pub parameter_count: u64,
    /// nnU-Net's planner estimate `compute_conv_feature_map_size(patch)` (elements, one
    /// sample), with the deep-supervision setting of `io`.
    pub nnunet_feature_map_size: u64,
    /// Estimated activation memory kept for backward for the whole batch, f32: every stored
    /// conv / norm / nonlinearity output of the table × batch × 4 bytes.
    pub activation_bytes: u64,
    /// Weights + gradients + SGD momentum, f32.
    pub parameter_bytes: u64,
    /// The formatted table.
    pub table: String,
}

fn human_bytes(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", units[u])
    }
}

fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn shape_str(s: &[usize]) -> String {
    if s.is_empty() {
        return "-".into();
    }
    let v: Vec<String> = s.iter().map(|x| x.to_string()).collect();
    format!("({})", v.join(", "))
}

/// [`network_summary_with`] with the default registry and deep supervision on (training).
pub fn network_summary(
    spec: &plans::ArchitectureSpec,
    in_channels: usize,
    num_classes: usize,
    patch: &[usize],
    batch: usize,
) -> Result<NetworkSummary, ArchError> {
    let io = NetworkIo {
        in_channels,
        num_classes,
        deep_supervision: true,
    };
    network_summary_with(&Registry::default(), spec, &io, patch, batch)
}

/// Builds the layer table of `spec` for a batch of `batch` patches of size `patch`.
pub fn network_summary_with(
    registry: &Registry,
    spec: &plans::ArchitectureSpec,
    io: &NetworkIo,
    patch: &[usize],
    batch: usize,
) -> Result<NetworkSummary, ArchError> {
    let (params, net) = registry.shape_only(spec, io)?;
    if patch.len() != net.spatial_dims() || patch.contains(&0) {
        return Err(ArchError::InvalidOption {
            path: "patch_size".into(),
            message: format!(
                "{:?} does not fit a {}D network (one positive size per spatial axis)",
                patch,
                net.spatial_dims()
            ),
        });
    }
    let rows = net.layers(patch);
    let estimator = registry.estimate(spec, io)?;
    let parameter_count = count_trainable(&params);
    let per_sample: u64 = rows
        .iter()
        .map(|r| {
            r.output_shape.iter().map(|&x| x as u64).product::<u64>() * r.stored_activations as u64
        })
        .sum();
    let activation_bytes = per_sample * batch as u64 * F32;
    let parameter_bytes = parameter_count * F32 * 3;
    let nnunet_feature_map_size = estimator.conv_feature_map_size(patch);

    let name_w = rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(5);
    let kind_w = rows
        .iter()
        .map(|r| r.kind.chars().count())
        .max()
        .unwrap_or(4)
        .max(5);
    let shape_w = rows
        .iter()
        .map(|r| shape_str(&r.output_shape).len())
        .max()
        .unwrap_or(5)
        .max(12);
    let mut t = String::new();
    t.push_str(&format!(
        "{}  (input {} ch, {} segmentation heads, patch {}, batch {})\n",
        spec.network_class_name,
        io.in_channels,
        io.num_classes,
        shape_str(patch),
        batch
    ));
    let header = format!(
        "{:<name_w$}  {:<kind_w$}  {:<shape_w$}  {:>12}\n",
        "layer", "type", "output (C, *sp)", "params"
    );
    t.push_str(&header);
    t.push_str(&format!(
        "{}\n",
        "-".repeat(header.trim_end().chars().count())
    ));
    for r in &rows {
        let pad = kind_w.saturating_sub(r.kind.chars().count());
        t.push_str(&format!(
            "{:<name_w$}  {}{}  {:<shape_w$}  {:>12}\n",
            r.name,
            r.kind,
            " ".repeat(pad),
            shape_str(&r.output_shape),
            group_thousands(r.params)
        ));
    }
    t.push_str(&format!(
        "{}\n",
        "-".repeat(header.trim_end().chars().count())
    ));
    t.push_str(&format!(
        "trainable parameters: {}\n",
        group_thousands(parameter_count)
    ));
    t.push_str(&format!(
        "nnU-Net feature-map estimate (per sample): {}\n",
        group_thousands(nnunet_feature_map_size)
    ));
    t.push_str(&format!(
        "activation memory for backward (f32, batch {batch}): ~{}\n",
        human_bytes(activation_bytes)
    ));
    t.push_str(&format!(
        "weights + gradients + momentum (f32): {}\n",
        human_bytes(parameter_bytes)
    ));
    Ok(NetworkSummary {
        network_class_name: spec.network_class_name.clone(),
        patch: patch.to_vec(),
        batch,
        io: *io,
        rows,
        parameter_count,
        nnunet_feature_map_size,
        activation_bytes,
        parameter_bytes,
        table: t,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tiny_table_shapes_and_totals() {
        let spec = plans::ArchitectureSpec {
            network_class_name: "PlainConvUNet".into(),
            arch_kwargs: json!({
                "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
                "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                "n_conv_per_stage": [2, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": true,
                "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": true},
                "dropout_op": null, "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true}
            })
            .as_object()
            .unwrap()
            .clone(),
            kw_requires_import: vec![],
        };
        let s = network_summary(&spec, 1, 3, &[8, 32, 32], 2).unwrap();
        let by_name = |n: &str| s.rows.iter().find(|r| r.name == n).unwrap().clone();
        assert_eq!(
            by_name("encoder.stages.0.0.convs.0").output_shape,
            vec![4, 8, 32, 32]
        );
        assert_eq!(
            by_name("encoder.stages.1.0.convs.0").output_shape,
            vec![8, 8, 16, 16]
        );
        assert_eq!(
            by_name("encoder.stages.2.0.convs.1").output_shape,
            vec![16, 4, 8, 8]
        );
        assert_eq!(
            by_name("decoder.transpconvs.0").output_shape,
            vec![8, 8, 16, 16]
        );
        assert_eq!(
            by_name("decoder.seg_layers.1").output_shape,
            vec![3, 8, 32, 32]
        );
        assert_eq!(
            by_name("decoder.seg_layers.0").output_shape,
            vec![3, 8, 16, 16]
        );
        // first conv: 4*1*1*3*3 + 4 bias + 8 norm
        assert_eq!(by_name("encoder.stages.0.0.convs.0").params, 36 + 4 + 8);
        assert_eq!(
            s.rows.iter().map(|r| r.params).sum::<u64>(),
            s.parameter_count
        );
        assert!(s.table.contains("decoder.seg_layers.1"));
        assert!(s.table.contains("trainable parameters"));
        assert!(s.activation_bytes > 0 && s.nnunet_feature_map_size > 0);
        assert!(network_summary(&spec, 1, 3, &[32, 32], 2).is_err());
    }
}
