#[test]
fn probe() {
    let p = "/work/shared/fixtures/nnunet_checkpoint/Dataset991_Fixture3D/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth";
    let t = candle_core::pickle::PthTensors::new(p, Some("network_weights"));
    match t {
        Ok(t) => { let mut k: Vec<_> = t.tensor_infos().keys().cloned().collect(); k.sort(); println!("{} keys; {:?}", k.len(), &k[..5]);
            let x = t.get("decoder.seg_layers.0.bias").unwrap().unwrap(); println!("{x}"); }
        Err(e) => println!("ERR {e:?}"),
    }
}
