"""`invariance demo`: the whole product on a laptop, with nothing downloaded.

Writes generated shapes as a Parquet dataset, pretrains a tiny ViT on it (task: shape),
finetunes it for another task (texture) saving a safetensors checkpoint and per-epoch
metrics (clean and corrupted accuracy) per epoch, both through the code of
`invariance finetune`, then runs exactly what `invariance run` runs on a local Ray.
"""

from __future__ import annotations

import io
import shutil
import time
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from invariance.config import parse_config
from invariance.io.layout import REDUCED_ROBUSTNESS_CORRELATION
from invariance.io.run_metrics import read_run_metrics
from invariance.training.run import run_finetune, saved_progress
from invariance.training.config import parse_finetune_config
from invariance.io.synthetic import ShapesDataset, encode_png, make_shapes, to_parquet_bytes

DEMO_MODEL = {
    "arch": "vit_tiny_patch16_224",
    "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4, "num_classes": 4},
}
PRETRAIN_EPOCHS = 12
PRETRAIN = {"optimizer": "adamw", "lr": 3e-3, "batch_size": 64, "seed": 0, "epochs": PRETRAIN_EPOCHS,
            "checkpoint_every": PRETRAIN_EPOCHS, "corruptions": {"names": []}}  # fmt: skip
FINETUNE = {"optimizer": "sgd", "lr": 0.02, "batch_size": 64, "seed": 1,
            "corruptions": {"names": ["gaussian_noise", "gaussian_blur", "contrast", "jpeg"], "severities": [1, 3, 5],
                            "n_samples": 256}}  # fmt: skip


def demo_config(out: Path) -> dict:
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
        # Adam (its default step size): the reference's step at 100 iterations left the middle blocks
        # above the report's convergence threshold (mean loss 0.11-0.23); Adam's 100 steps cost the same
        "inversion": {"optimizer": "adam", "iterations": 100, "micro_batch": 96},
        "resources": {"num_cpus": 1, "num_gpus": 0},
    }


def finetune_configs(out: Path, epochs: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The pretraining and finetuning configs (`invariance finetune` configs without a sweep)."""
    common = {"model": DEMO_MODEL, "task": "classification", "num_classes": 4,
              "data": {"format": "parquet", "path": str(out / "datasets"), "n_test": 512}}  # fmt: skip
    pretrain = {**common, **PRETRAIN, "output": str(out / "pretrain"), "pretrained": None}
    pretrain["data"] = {**common["data"], "label_column": "shape"}
    finetune = {**common, **FINETUNE, "output": str(out / "checkpoints" / "finetune"), "epochs": epochs,
                "pretrained": str(out / "checkpoints" / "pretrained.safetensors")}  # fmt: skip
    finetune["data"] = {**common["data"], "label_column": "texture"}
    return pretrain, finetune


def _shapes_parquet(dataset: ShapesDataset) -> bytes:
    """Images with both label columns, ``shape`` and ``texture``: one dataset serves both tasks."""
    images = [{"bytes": encode_png(image), "path": f"{index:05d}.png"} for index, image in enumerate(dataset.images)]
    table = pa.table({"image": images, "shape": pa.array(dataset.shape.tolist(), pa.int64()),
                      "texture": pa.array(dataset.texture.tolist(), pa.int64())})  # fmt: skip
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _train_models(out: Path, epochs: int) -> None:
    # One intra-op thread: for a model this small a second thread gains ~20% on an idle
    # 2-core machine, and costs 5-20x when anything else runs (OpenMP threads wait on each other).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _pretrain_and_finetune(out, epochs)
    finally:
        torch.set_num_threads(threads)


def _pretrain_and_finetune(out: Path, epochs: int) -> None:
    from jobs.run import plural

    datasets = out / "datasets"
    datasets.mkdir(parents=True, exist_ok=True)
    (datasets / "train-00000-of-00001.parquet").write_bytes(_shapes_parquet(make_shapes(1536, seed=1)))
    (datasets / "test-00000-of-00001.parquet").write_bytes(_shapes_parquet(make_shapes(512, seed=2)))
    pretrain, finetune = (parse_finetune_config(raw) for raw in finetune_configs(out, epochs))
    for config in (pretrain, finetune):  # a run left by other settings (another --epochs): start it over
        progress = saved_progress(config)
        if progress is not None and not progress.same_settings:
            shutil.rmtree(config.output)

    print(f"pretraining a tiny ViT on task 'shape' ({PRETRAIN_EPOCHS} epochs)...", flush=True)
    run_finetune(pretrain, on_epoch=lambda row: print(f"  epoch {row['epoch']}: loss {row['train_loss']:.3f}", flush=True))
    print(f"  pretrained accuracy on 'shape': {read_run_metrics(pretrain.output)['clean_accuracy'][-1]:.1%}")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "pretrain" / f"epoch={PRETRAIN_EPOCHS:02d}.safetensors", out / "checkpoints" / "pretrained.safetensors")

    print(f"finetuning on task 'texture' ({plural(epochs, 'epoch')}, a checkpoint per epoch)...", flush=True)

    def report(row: dict[str, Any]) -> None:
        print(f"  epoch {row['epoch']}: loss {row['train_loss']:.3f}, accuracy on 'texture' {row['clean_accuracy']:.1%}"
              f" (corrupted test sets: {row['corrupted_accuracy']:.1%})", flush=True)  # fmt: skip

    run_finetune(finetune, on_epoch=report)


def run_demo(out: str | Path = "invariance-demo", epochs: int = 3) -> int:
    """Train (unless the checkpoints exist), run the pipeline, print the last epoch's curves.
    Returns how many shards failed (0: everything computed; they are listed above)."""
    from jobs.run import plural, run

    started = time.time()
    out = Path(out).resolve()
    expected = [out / "checkpoints" / "pretrained.safetensors"] + [
        out / "checkpoints" / "finetune" / f"epoch={e:02d}.safetensors" for e in range(1, epochs + 1)
    ]
    if all(path.exists() for path in expected):
        print(f"using the checkpoints already in {out / 'checkpoints'} (delete the folder to retrain)")
    else:
        # new weights under the same file names: results of the old ones must not count as done
        shutil.rmtree(out / "results", ignore_errors=True)
        _train_models(out, epochs)
    data = out / "data" / "test-00000-of-00001.parquet"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_bytes(to_parquet_bytes(make_shapes(256, seed=3), "texture"))

    raw = demo_config(out)
    config_path = out / "demo.yaml"
    config_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    print(f"run config: {config_path}  (rerun it with: invariance run {config_path})", flush=True)
    result = run(parse_config(raw), num_cpus=2)
    if result is None:  # another demo in the same folder holds the lease; run() said so
        print(f"nothing computed here: wait for the other run, then look in {out / 'results'}")
        return 0

    curves = result.reduced.curves
    if curves.is_empty():  # the lease was lost mid-run, or every shard failed; run() said so
        return len(result.execution.failures)
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
    correlation = out / "results" / REDUCED_ROBUSTNESS_CORRELATION
    if correlation.exists():
        row = pl.read_parquet(correlation).row(0, named=True)
        r = f"{row['pearson_r']:.3f}" if row["pearson_r"] is not None else "undefined"
        print(f"\nrobustness link over {plural(row['n_epochs'], 'epoch')}: Pearson r = {r} between the std of forgetting "
              "across layers and the accuracy on corrupted test sets (plots/robustness.png)")  # fmt: skip
    print(f"\nplots:  {out / 'results' / 'plots'}\ntables: {out / 'results' / 'reduced'}")
    print(f"demo finished in {time.time() - started:.0f}s")
    return len(result.execution.failures)
