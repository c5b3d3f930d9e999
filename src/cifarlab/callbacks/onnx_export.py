"""Keeps an ONNX export of the best checkpoint next to the run's checkpoints."""

import time
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from cifarlab.data.datamodule import CIFAR10DataModule
from cifarlab.export.onnx import export_onnx, preload_exporter, verify_onnx
from cifarlab.export.reference import embed_reference
from cifarlab.models.module import ImageClassifier
from cifarlab_contract.model import contract_metadata

if TYPE_CHECKING:
    from torch.onnx._internal.exporter._registration import ONNXRegistry


class OnnxExport(Callback):
    """Exports the best checkpoint at fit end and, with `every_best`, each new best checkpoint once it is saved.

    Each export is checked with ONNX Runtime against the PyTorch model on real validation images and a
    divergence fails the run (ExportError). Without any checkpoint (fast_dev_run) the final weights are exported.
    Each export carries, in its metadata, the exported model's statistics on the validation images, which the
    server's drift monitor compares live traffic with (`reference_sample` bounds its stored sample).
    """

    def __init__(
        self,
        dirpath: str,
        run_id: str,
        filename: str = "model.onnx",
        every_best: bool = False,
        verify_images: int = 256,
        tolerance: float = 1e-4,
        reference_sample: int = 2000,
    ) -> None:
        self.path = Path(dirpath) / filename
        self.run_id = run_id
        self.every_best = every_best
        self.verify_images = verify_images
        self.tolerance = tolerance
        self.reference_sample = reference_sample
        self.exported_from: str | None = None
        self.difference: float | None = None
        self._preload: Future[ONNXRegistry] | None = None  # the exporter's registry, being built

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._preload = preload_exporter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoints are written at the end of each epoch after every other callback has run (Lightning
        # orders ModelCheckpoint last, and only end-of-epoch checkpoints resume exactly): the next epoch's
        # start is the first moment a new best is on disk.
        if self.every_best and trainer.is_global_zero:
            self._export_new_best(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not self._export_new_best(trainer, pl_module) and self.exported_from is None:
            self._export(trainer, _cpu_copy(pl_module), source="final weights")
            self.exported_from = "final weights"

    def _export_new_best(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint):
            return False
        best = checkpoint.best_model_path
        # The best file keeps its name when it is overwritten, so its score tells a new best apart.
        identity = f"{best}@{checkpoint.best_model_score}" if best else ""
        if not best or identity == self.exported_from:
            return False
        # Rebuild from the file, not from the live weights: the export is then exactly the checkpoint's model.
        best_module = type(pl_module).load_from_checkpoint(best, map_location="cpu")
        self._export(trainer, best_module, source=best)
        self.exported_from = identity
        return True

    def _export(self, trainer: L.Trainer, module: L.LightningModule, source: str) -> None:
        if not isinstance(module, ImageClassifier):
            raise TypeError(f"ONNX export needs an ImageClassifier, got {type(module).__name__}")
        datamodule = getattr(trainer, "datamodule", None)  # set by Lightning at fit time, not declared
        if not isinstance(datamodule, CIFAR10DataModule):
            raise TypeError(f"ONNX export reads its metadata from a CIFAR10DataModule, got {type(datamodule).__name__}")
        start = time.perf_counter()
        # Long done after the first epoch; an error in the preload (an import) is raised here.
        registry = self._preload.result() if self._preload is not None else None
        metadata = contract_metadata(
            module.class_names, self.run_id, datamodule.load().manifest_sha256, checkpoint=Path(source).name
        )
        export_onnx(module.net, self.path, metadata, registry)
        images = datamodule.val_images  # stored shuffled (prepare): a strided slice covers every class
        images = images[:: max(1, len(images) // self.verify_images)][: self.verify_images]
        self.difference = verify_onnx(self.path, module.net, images, self.tolerance)
        embed_reference(self.path, datamodule.val_images.cpu().numpy(), self.reference_sample)
        seconds = time.perf_counter() - start
        rank_zero_info(
            f"Exported {self.path} from {source} in {seconds:.1f} s (max softmax difference {self.difference:.2e})"
        )


def _cpu_copy(module: L.LightningModule) -> L.LightningModule:
    """The module rebuilt on the CPU, as a checkpoint is loaded: the export traces on the CPU (an example input
    there, the graph free of the training device) and the live module stays where it trains."""
    copy = type(module)(**module.hparams)
    copy.load_state_dict({name: tensor.cpu() for name, tensor in module.state_dict().items()})
    return copy
