"""Rank program the trainer tests launch with DeepSpeed's launchers (one process per CPU rank).

    trainer_worker.py grads OUT_DIR            one accumulation step per ZeRO stage 0..3; rank 0 writes
                                               OUT_DIR/grads_stage{z}.safetensors + the batch keys
    trainer_worker.py train CONFIG [k=v ...]   a full Trainer.fit() with the LinearEnergy objective
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_trainer_fixtures import ListLoader, LinearEnergy, load_mp20, register  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402


class RecordingLoader(ListLoader):
    """Also remembers the keys of each batch it yields (to rebuild the one big batch)."""

    seen: list

    def __iter__(self):
        self.seen = []
        for batch in super().__iter__():
            self.seen.append(batch.keys)
            yield batch


def grads(out_dir: Path) -> None:
    import deepspeed
    from safetensors.torch import save_file

    records = load_mp20(48)
    for stage in (0, 1, 2, 3):
        config = load_config(None, [
            f"run.root={out_dir}", f"run.name=grads{stage}", "tracking.mlflow=false", "checkpoint.resume=none",
            f"train.zero_stage={stage}", "train.grad_accum=2", "optim.grad_clip=0", "optim.lr=0.1",
        ])
        # Trainer seeds before building: pass a builder-made objective under the same seed.
        torch.manual_seed(config.run.seed)
        objective = LinearEnergy(dim=8)
        trainer = Trainer(config, objective=objective, loader=_loader(records), log=lambda s: None)
        trainer.forward_backward()
        full = {}
        for name, param in trainer.engine.module.named_parameters():
            grad = deepspeed.utils.safe_get_full_grad(param)
            full[name] = grad.detach().clone().float().contiguous()
        keys = [None] * trainer.world_size
        dist.all_gather_object(keys, trainer.loader.seen)
        init = {}
        for name, param in trainer.engine.module.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                init[name] = param.detach().clone().float().contiguous()
        if trainer.rank == 0:
            save_file(full, str(out_dir / f"grads_stage{stage}.safetensors"))
            save_file(init, str(out_dir / f"init_stage{stage}.safetensors"))
            (out_dir / f"keys_stage{stage}.json").write_text(json.dumps(keys))
        trainer.optimizer_step()
        trainer.engine.destroy()
    dist.barrier()


def _loader(records):
    rank, world = dist.get_rank(), dist.get_world_size()
    return RecordingLoader(records, rank=rank, world_size=world)


def train(config_path: str, overrides: list[str]) -> None:
    register()
    config = load_config(config_path, overrides)
    records = load_mp20(64)
    from pretrain.distributed import init_distributed

    info = init_distributed(config.train.backend)
    loader = ListLoader(records, rank=info.rank, world_size=info.world_size, seed=config.run.seed)
    from pretrain.objectives import build_objective

    torch.manual_seed(config.run.seed)
    trainer = Trainer(config, objective=build_objective(config.objective), loader=loader)
    summary = trainer.fit()
    if trainer.rank == 0:
        (config.run_dir / "summary.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # DeepSpeed's launcher adds it
    mode = argv[0]
    if mode == "grads":
        from pretrain.distributed import init_distributed

        init_distributed("gloo")
        grads(Path(argv[1]))
    elif mode == "train":
        train(argv[1], argv[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
