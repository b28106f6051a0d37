//! Activation-memory estimates, exactly as dynamic-network-architectures computes them.
//!
//! nnU-Net's planner sizes patches and batches with `net.compute_conv_feature_map_size(patch)`:
//! the number of output elements of every convolution, transposed convolution and segmentation
//! head in the network, for a single sample (it does not depend on the batch size). This module
//! reproduces that count for `PlainConvUNet` and `ResidualEncoderUNet` without building the
//! network, so the planner needs neither a GPU nor candle. Every registry architecture
//! implements [`MemoryEstimate`] so that any of them can be planned with the same currency.
//!
//! Conventions follow dna 0.4.4:
//! - every conv uses "same" padding, so its output size is `input // stride` per axis;
//! - the encoder's stage `s` receives the output of stage `s-1` and its first conv (or block)
//!   carries `strides[s]`;
//! - the decoder has `n_stages - 1` stages; stage `s` (counted from the bottleneck) upsamples
//!   with a transposed conv to the size of encoder skip `n_stages - 2 - s` and counts
//!   `(n_conv_decoder[s] + 1) * features[skip] * prod(size)` (convs plus the transposed conv);
//! - a segmentation head (`num_classes * prod(size)`) is counted for the last decoder stage
//!   only, or for every stage with deep supervision (nnU-Net plans without it).

use std::fmt;

/// Something that can report nnU-Net's activation estimate for a patch.
pub trait MemoryEstimate {
    /// nnU-Net's `compute_conv_feature_map_size(patch)`: number of conv/transposed-conv/seg-head
    /// output elements for one sample with spatial size `patch`.
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64;
}

/// The topology of a U-Net as written in `arch_kwargs` (plus the channel counts nnU-Net
/// passes in at build time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetTopology {
    pub input_channels: usize,
    pub n_stages: usize,
    pub features_per_stage: Vec<usize>,
    pub kernel_sizes: Vec<Vec<usize>>,
    pub strides: Vec<Vec<usize>>,
    /// Convs per encoder stage for `PlainConvUNet` (`n_conv_per_stage`), residual blocks per
    /// encoder stage for `ResidualEncoderUNet` (`n_blocks_per_stage`).
    pub n_conv_per_stage: Vec<usize>,
    /// `n_stages - 1` entries, ordered from the bottleneck upwards (as in dna).
    pub n_conv_per_stage_decoder: Vec<usize>,
    pub num_classes: usize,
    pub deep_supervision: bool,
}

/// A topology that does not describe a buildable network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyError(pub String);

impl fmt::Display for TopologyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid U-Net topology: {}", self.0)
    }
}

impl std::error::Error for TopologyError {}

impl UNetTopology {
    /// Checks the list lengths dna asserts on (and that strides/kernels have one entry per
    /// spatial axis of `dim`).
    pub fn validate(&self, dim: usize) -> Result<(), TopologyError> {
        let n = self.n_stages;
        if n == 0 {
            return Err(TopologyError("n_stages must be at least 1".into()));
        }
        let check = |name: &str, len: usize, want: usize| {
            if len == want {
                Ok(())
            } else {
                Err(TopologyError(format!(
                    "{name} has {len} entries, expected {want}"
                )))
            }
        };
        check("features_per_stage", self.features_per_stage.len(), n)?;
        check("kernel_sizes", self.kernel_sizes.len(), n)?;
        check("strides", self.strides.len(), n)?;
        check("n_conv_per_stage", self.n_conv_per_stage.len(), n)?;
        check(
            "n_conv_per_stage_decoder",
            self.n_conv_per_stage_decoder.len(),
            n - 1,
        )?;
        for (s, st) in self.strides.iter().enumerate() {
            check(&format!("strides[{s}]"), st.len(), dim)?;
            if st.contains(&0) {
                return Err(TopologyError(format!("strides[{s}] contains 0")));
            }
        }
        for (s, k) in self.kernel_sizes.iter().enumerate() {
            check(&format!("kernel_sizes[{s}]"), k.len(), dim)?;
        }
        if self.n_conv_per_stage.contains(&0) {
            return Err(TopologyError(
                "n_conv_per_stage entries must be >= 1".into(),
            ));
        }
        Ok(())
    }

    /// Spatial size after each encoder stage: `sizes[s] = sizes[s-1] // strides[s]`, with
    /// `sizes[-1] = patch`. Missing stride entries count as 1 so this never panics.
    pub fn stage_sizes(&self, patch: &[usize]) -> Vec<Vec<usize>> {
        let mut cur = patch.to_vec();
        let mut out = Vec::with_capacity(self.n_stages);
        for s in 0..self.n_stages {
            let stride = self.strides.get(s);
            cur = cur
                .iter()
                .enumerate()
                .map(|(d, &v)| v / stride.and_then(|st| st.get(d)).copied().unwrap_or(1).max(1))
                .collect();
            out.push(cur.clone());
        }
        out
    }

    fn features(&self, s: usize) -> u64 {
        self.features_per_stage.get(s).copied().unwrap_or(0) as u64
    }
}

fn prod(sizes: &[usize]) -> u64 {
    sizes.iter().map(|&v| v as u64).product()
}

/// dna `UNetDecoder.compute_conv_feature_map_size` (shared by both U-Nets).
fn decoder_feature_map_size(t: &UNetTopology, sizes: &[Vec<usize>]) -> u64 {
    let n = t.n_stages;
    let mut out = 0u64;
    for s in 0..n.saturating_sub(1) {
        // decoder stage s works at the resolution of encoder skip j
        let j = n - 2 - s;
        let vox = prod(&sizes[j]);
        let ch = t.features(j);
        let n_conv = t.n_conv_per_stage_decoder.get(s).copied().unwrap_or(0) as u64;
        out += n_conv * ch * vox; // StackedConvBlocks (stride 1)
        out += ch * vox; // transposed conv
        if t.deep_supervision || s == n - 2 {
            out += t.num_classes as u64 * vox; // seg head
        }
    }
    out
}

/// `PlainConvUNet.compute_conv_feature_map_size(patch)`.
pub fn plain_conv_unet_feature_map_size(t: &UNetTopology, patch: &[usize]) -> u64 {
    let sizes = t.stage_sizes(patch);
    let mut out = 0u64;
    for (s, size) in sizes.iter().enumerate() {
        // StackedConvBlocks: the first conv carries the stride, all convs output features[s]
        let n_conv = t.n_conv_per_stage.get(s).copied().unwrap_or(0) as u64;
        out += n_conv * t.features(s) * prod(size);
    }
    out + decoder_feature_map_size(t, &sizes)
}

/// `ResidualEncoderUNet.compute_conv_feature_map_size(patch)` with the default stem
/// (`stem_channels = features[0]`) and `BasicBlockD` blocks.
pub fn residual_encoder_unet_feature_map_size(t: &UNetTopology, patch: &[usize]) -> u64 {
    let sizes = t.stage_sizes(patch);
    // stem: one conv, stride 1, features[0] output channels
    let stem_channels = t.features(0);
    let mut out = stem_channels * prod(patch);
    let mut in_ch = stem_channels;
    let mut in_size: Vec<usize> = patch.to_vec();
    for (s, size) in sizes.iter().enumerate() {
        let ch = t.features(s);
        let vox = prod(size);
        let n_blocks = t.n_conv_per_stage.get(s).copied().unwrap_or(0) as u64;
        if n_blocks > 0 {
            // BasicBlockD: conv1 + conv2, plus the 1x1 projection on the skip if the channels
            // or the spatial size change (dna compares sizes, not strides)
            out += 2 * ch * vox;
            if in_ch != ch || in_size != *size {
                out += ch * vox;
            }
            // remaining blocks: stride 1, in == out, no projection
            out += (n_blocks - 1) * 2 * ch * vox;
        }
        in_ch = ch;
        in_size = size.clone();
    }
    out + decoder_feature_map_size(t, &sizes)
}

/// Which U-Net an [`UNetTopology`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetVariant {
    /// `dynamic_network_architectures.architectures.unet.PlainConvUNet`
    PlainConv,
    /// `dynamic_network_architectures.architectures.unet.ResidualEncoderUNet`
    ResidualEncoder,
}

/// A U-Net variant with its topology; the planner's estimator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UNetEstimate {
    pub variant: UNetVariant,
    pub topology: UNetTopology,
}

impl MemoryEstimate for UNetEstimate {
    fn conv_feature_map_size(&self, patch: &[usize]) -> u64 {
        match self.variant {
            UNetVariant::PlainConv => plain_conv_unet_feature_map_size(&self.topology, patch),
            UNetVariant::ResidualEncoder => {
                residual_encoder_unet_feature_map_size(&self.topology, patch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo(
        dim: usize,
        features: &[usize],
        strides: &[usize],
        enc: &[usize],
        dec: &[usize],
        num_classes: usize,
        ds: bool,
    ) -> UNetTopology {
        UNetTopology {
            input_channels: 1,
            n_stages: features.len(),
            features_per_stage: features.to_vec(),
            kernel_sizes: vec![vec![3; dim]; features.len()],
            strides: strides.iter().map(|&s| vec![s; dim]).collect(),
            n_conv_per_stage: enc.to_vec(),
            n_conv_per_stage_decoder: dec.to_vec(),
            num_classes,
            deep_supervision: ds,
        }
    }

    #[test]
    fn tiny_plain_by_hand() {
        // 2 stages, 2D, features 4/8, strides 1/2, 2 convs enc, 1 conv dec, 3 classes, patch 8x6
        let t = topo(2, &[4, 8], &[1, 2], &[2, 2], &[1], 3, false);
        t.validate(2).unwrap();
        // encoder: 2*4*48 + 2*8*12 = 384 + 192 = 576
        // decoder (at 8x6, 4 ch): conv 1*4*48=192, transp 4*48=192, seg 3*48=144 -> 528
        assert_eq!(plain_conv_unet_feature_map_size(&t, &[8, 6]), 576 + 528);
    }

    #[test]
    fn tiny_plain_odd_sizes_floor() {
        // 3 stages 1D-like 2D with anisotropic stride; patch 7x5 -> (7,5) -> (3,2) -> (1,2)
        let mut t = topo(2, &[2, 4, 8], &[1, 2, 2], &[1, 1, 1], &[1, 1], 2, false);
        t.strides[2] = vec![2, 1];
        // enc: 2*35 + 4*6 + 8*2 = 70+24+16 = 110
        // dec s=0 (j=1, 4ch, 6 vox): 1*4*6 + 4*6 = 48 (no seg)
        // dec s=1 (j=0, 2ch, 35 vox): 2*35 + 2*35 + 2*35 = 210
        assert_eq!(
            plain_conv_unet_feature_map_size(&t, &[7, 5]),
            110 + 48 + 210
        );
        // deep supervision adds the low-res head: 2*6
        t.deep_supervision = true;
        assert_eq!(
            plain_conv_unet_feature_map_size(&t, &[7, 5]),
            110 + 48 + 210 + 12
        );
    }

    #[test]
    fn tiny_residual_by_hand() {
        // features 4/8, strides 1/2, blocks 1/2, dec 1, 3 classes, patch 8x6 (48 -> 12 voxels)
        let t = topo(2, &[4, 8], &[1, 2], &[1, 2], &[1], 3, false);
        // stem 4*48 = 192
        // stage 0: in 4 == out 4, same size -> 2*4*48 = 384 (no projection)
        // stage 1: block0 2*8*12 + projection 8*12 = 288; block1 2*8*12 = 192
        // decoder: 192 + 192 + 144 = 528
        assert_eq!(
            residual_encoder_unet_feature_map_size(&t, &[8, 6]),
            192 + 384 + 288 + 192 + 528
        );
    }

    #[test]
    fn reference_values_plain() {
        // nnunet-v2.md §8.3 (computed with dna 0.4.4), 3 classes, no DS
        let t3 = topo(
            3,
            &[32, 64, 128, 256, 320, 320],
            &[1, 2, 2, 2, 2, 2],
            &[2; 6],
            &[2; 5],
            3,
            false,
        );
        assert_eq!(
            plain_conv_unet_feature_map_size(&t3, &[128, 128, 128]),
            452_796_416
        );
        let t2 = topo(
            2,
            &[32, 64, 128, 256, 512, 512, 512],
            &[1, 2, 2, 2, 2, 2, 2],
            &[2; 7],
            &[2; 6],
            3,
            false,
        );
        assert_eq!(
            plain_conv_unet_feature_map_size(&t2, &[512, 512]),
            82_771_968
        );
    }

    #[test]
    fn reference_values_residual() {
        let enc = [1, 3, 4, 6, 6, 6];
        let mut t3 = topo(
            3,
            &[32, 64, 128, 256, 320, 320],
            &[1, 2, 2, 2, 2, 2],
            &enc,
            &[1; 5],
            3,
            false,
        );
        assert_eq!(
            residual_encoder_unet_feature_map_size(&t3, &[128, 128, 128]),
            557_420_544
        );
        // the value in nnU-Net's residual_encoder_unet_planners.py __main__ (deep supervision on)
        t3.deep_supervision = true;
        assert_eq!(
            residual_encoder_unet_feature_map_size(&t3, &[128, 128, 128]),
            558_319_104
        );
        let t2 = topo(
            2,
            &[32, 64, 128, 256, 512, 512, 512],
            &[1, 2, 2, 2, 2, 2, 2],
            &[1, 3, 4, 6, 6, 6, 6],
            &[1; 6],
            3,
            true,
        );
        assert_eq!(
            residual_encoder_unet_feature_map_size(&t2, &[512, 512]),
            129_793_792
        );
        let est = UNetEstimate {
            variant: UNetVariant::ResidualEncoder,
            topology: t2,
        };
        assert_eq!(est.conv_feature_map_size(&[512, 512]), 129_793_792);
    }

    #[test]
    fn validate_catches_bad_lengths() {
        let mut t = topo(3, &[4, 8], &[1, 2], &[2, 2], &[2], 2, false);
        assert!(t.validate(3).is_ok());
        assert!(t.validate(2).is_err());
        t.n_conv_per_stage_decoder.push(2);
        assert!(t.validate(3).is_err());
    }
}
