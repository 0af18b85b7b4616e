"""`invariance demo`: the whole product on a laptop, with nothing downloaded.

Pretrains a tiny ViT on generated shapes (task: shape), finetunes it on the same kind of
images for another task (texture) saving a safetensors checkpoint per epoch, writes the
eval images as a Parquet table, then runs exactly what `invariance run` runs on a local Ray.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import torch
import yaml
from safetensors.torch import save_file

from invariance.config import ModelConfig, parse_config
from invariance.models import FeatureModel, build_network
from invariance.synthetic import make_shapes, to_parquet_bytes
from invariance.training import TrainSettings, accuracy, train_classifier

DEMO_MODEL = {
    "arch": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 4},
}
PRETRAIN = TrainSettings(epochs=12, lr=3e-3, optimizer="adamw", batch_size=64, seed=0)
FINETUNE_LR = 0.02


def demo_config(out: Path, epochs: int) -> dict:
    """The embedded default run config, pointing at the demo's own files."""
    return {
        "output": str(out / "results"),
        "model": DEMO_MODEL,
        "pretrained": str(out / "checkpoints" / "pretrained.safetensors"),
        "checkpoints": str(out / "checkpoints" / "finetune" / "epoch={epoch}.safetensors"),
        "data": {"format": "parquet", "path": str(out / "data"), "split": "test", "n_samples": 96},
        "layers": "all",
        "token_policy": "flatten",
        "seeds": [0, 1],
        "inversion": {"iterations": 100, "step_size": 0.5, "micro_batch": 96},
        "resources": {"num_cpus": 1, "num_gpus": 0},
    }


def _train_models(out: Path, epochs: int) -> None:
    checkpoints = out / "checkpoints"
    (checkpoints / "finetune").mkdir(parents=True, exist_ok=True)
    network = build_network(ModelConfig(**DEMO_MODEL))
    wrapper = FeatureModel(network, network.pretrained_cfg["mean"], network.pretrained_cfg["std"])
    normalize = lambda images: (images - wrapper.mean) / wrapper.std  # noqa: E731
    train, test = make_shapes(1536, seed=1), make_shapes(512, seed=2)
    torch.manual_seed(0)
    network.requires_grad_(True)  # FeatureModel froze it for feature extraction

    print(f"pretraining a tiny ViT on task 'shape' ({PRETRAIN.epochs} epochs)...", flush=True)
    train_classifier(network, train.images, train.shape, PRETRAIN, normalize,
                     on_epoch_end=lambda e, loss: print(f"  epoch {e}: loss {loss:.3f}", flush=True))  # fmt: skip
    print(f"  pretrained accuracy on 'shape': {accuracy(network, normalize, test.images, test.shape):.1%}")
    save_file(network.state_dict(), str(checkpoints / "pretrained.safetensors"))

    print(f"finetuning on task 'texture' ({epochs} epochs, a checkpoint per epoch)...", flush=True)
    network.reset_classifier(4)
    network.requires_grad_(True)

    def save_epoch(epoch: int, loss: float) -> None:
        save_file(network.state_dict(), str(checkpoints / "finetune" / f"epoch={epoch:02d}.safetensors"))
        acc = accuracy(network, normalize, test.images, test.texture)
        print(f"  epoch {epoch}: loss {loss:.3f}, accuracy on 'texture' {acc:.1%}", flush=True)
        network.train()

    settings = TrainSettings(epochs=epochs, lr=FINETUNE_LR, optimizer="sgd", batch_size=64, seed=1)
    train_classifier(network, train.images, train.texture, settings, normalize, on_epoch_end=save_epoch)


def run_demo(out: str | Path = "invariance-demo", epochs: int = 3) -> pl.DataFrame:
    """Train (unless the checkpoints exist), run the pipeline, print the last epoch's curves."""
    from jobs.run import run

    started = time.time()
    out = Path(out).resolve()
    expected = [out / "checkpoints" / "pretrained.safetensors"] + [
        out / "checkpoints" / "finetune" / f"epoch={e:02d}.safetensors" for e in range(1, epochs + 1)
    ]
    if all(path.exists() for path in expected):
        print(f"using the checkpoints already in {out / 'checkpoints'} (delete the folder to retrain)")
    else:
        _train_models(out, epochs)
    data = out / "data" / "test-00000-of-00001.parquet"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(to_parquet_bytes(make_shapes(256, seed=3), "texture"))

    raw = demo_config(out, epochs)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"run config: {config_path}  (rerun it with: invariance run {config_path})", flush=True)
    result = run(parse_config(raw), num_cpus=2)

    curves = result.reduced.curves
    last = curves.filter(pl.col("epoch") == curves["epoch"].max()).select(
        "layer",
        pl.col("forgetting_mean").round(4).alias("forgetting"),
        pl.col("forgetting_std").round(4).alias("±"),
        pl.col("learning_mean").round(4).alias("learning"),
        pl.col("learning_std").round(4).alias("± "),
        pl.col("cka_divergence_mean").round(4).alias("cka_divergence"),
    )
    with pl.Config(tbl_rows=50, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
        print(f"\nlast checkpoint (epoch {curves['epoch'].max()}), mean ± std over seeds {raw['seeds']}:")
        print(last)
    print(f"\nplots:  {out / 'results' / 'plots'}\ntables: {out / 'results' / 'reduced'}")
    print(f"demo finished in {time.time() - started:.0f}s")
    return curves
