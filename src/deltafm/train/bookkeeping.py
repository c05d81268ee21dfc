"""Everything around the steps: the output folder, log records, the progress bar, sample grids, checkpoints.

Rank 0 writes, every byte through the run's :class:`~deltafm.train.runfolder.RunFolder` (lock, atomic
files, crash-safe checkpoints, debris removal); the other ranks take part in the collective parts (a
checkpoint gathers every rank's random streams and adds the mean target's sums over ranks). Log values
come from the step's one host synchronisation (:class:`~deltafm.train.step.StepStats`), so logging reads
no tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .builders import SetupError
from .config import format_config
from .distributed import barrier, broadcast_object
from .logging import RunLogger, measure_matmul_peak, mfu
from .setup import Run
from .step import StepStats

__all__ = ["Bookkeeper", "Window", "sample_grid"]


@dataclass
class Window:
    """Sums over the steps since the last log record."""

    seconds: float = 0.0
    images: int = 0
    steps: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss, positive, negative, repa

    def add(self, stats: StepStats, seconds: float, images: int) -> None:
        self.seconds += seconds
        self.images += images
        self.steps += 1
        self.sums = [s + v for s, v in zip(self.sums, (stats.loss, stats.positive, stats.negative, stats.repa))]


class Bookkeeper:
    """Opens the run folder (config, log, banner, progress bar) and does the per-step bookkeeping.

    ``status`` ends as ``done`` or ``interrupted``; ``metrics`` holds the last log record and ``grid``
    the last sample grid."""

    def __init__(self, run: Run, resume: str | None) -> None:
        self.run = run
        self._prepare_output(resume)
        cfg, di = run.cfg, run.di
        self.logger = RunLogger.for_run(run.folder, cfg, enabled=di.is_main)
        self.flops = run.raw.flops_per_sample() if hasattr(run.raw, "flops_per_sample") else None
        self.peak = cfg.log.peak_flops or measure_matmul_peak(di.device, run.compute_dtype)
        self._announce()
        self.bar = None
        if di.is_main and cfg.log.progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True, desc="train")
        self.window = Window()
        self.metrics: dict[str, float] = {}
        self.grid: Path | None = None
        self.status = "done"

    def _prepare_output(self, resume: str | None) -> None:
        """Everything was validated: open the run folder (lock, debris), write config.yaml, set aside the
        checkpoints a resume skipped. A rank-0 failure stops every rank."""
        run = self.run
        failure: Exception | None = None
        if run.di.is_main:
            try:
                run.folder.open(run.say)
                run.folder.write_text("config.yaml", format_config(run.cfg))
                ckpt = run.resumed_from
                if resume is not None and (ckpt is None or ckpt.parent.resolve() == run.folder.checkpoints.resolve()):
                    # step folders newer than the one resumed from were skipped as invalid
                    run.folder.set_aside_newer(run.step if ckpt is not None else -1, lambda m: run.say(f"warning: {m}"))
            except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
                failure = e
        message = broadcast_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise SetupError(f"rank 0 could not open the run folder: {message}")
        barrier()

    def _announce(self) -> None:
        run, cfg, di, info = self.run, self.run.cfg, self.run.di, self.run.info
        nparams = sum(p.numel() for p in run.raw.parameters())
        ckpt = run.resumed_from
        run.say(f"deltafm train: {cfg.model.name} ({nparams / 1e6:.2f}M params) on {info.name} "
                f"({info.num_items} items, {info.channels}x{info.image_size}x{info.image_size}); "
                f"{di.world_size} rank(s) on {di.device.type}, {run.threads} thread(s) each; batch "
                f"{cfg.train.batch_size}; lam {cfg.objective.lam}; {_repa_text(cfg)}"
                f"{'resuming from ' + str(ckpt) if ckpt else 'from scratch'}; until step {run.total_steps}; "
                f"out {run.out_dir}")
        if ckpt is None:
            self.logger.event(run.step, run.images, "start", params=nparams, world_size=di.world_size,
                              threads=run.threads)
        else:
            self.logger.event(run.step, run.images, "resume", checkpoint=str(ckpt), world_size=di.world_size)

    def after_step(self, stats: StepStats, seconds: float) -> None:
        """Window, progress bar, a log record every ``log.every`` steps, a grid every ``sample.every``."""
        run, cfg = self.run, self.run.cfg
        self.window.add(stats, seconds, cfg.train.batch_size)
        if self.bar is not None:
            self.bar.update(1)
        if run.step % cfg.log.every == 0 or stats.stop or run.finished:
            self._log(stats)
        if cfg.sample.every > 0 and run.step % cfg.sample.every == 0 and not run.finished:
            self.grid = sample_grid(run)

    def _log(self, stats: StepStats) -> None:
        run, w = self.run, self.window
        n = max(w.steps, 1)
        ips = w.images / max(w.seconds, 1e-9)
        loss, pos, neg, repa = (s / n for s in w.sums)
        m = {"loss": loss, "positive": pos, "negative": neg, "lam": run.objective.lam_at(run.images),
             "lr": stats.lr, "grad_norm": stats.grad_norm, "images_per_s": ips, "s_per_step": w.seconds / n}
        if run.targets is not None:
            m["repa"] = repa
        u = mfu(self.flops, ips, self.peak * run.di.world_size)
        if u is not None:
            m["mfu"] = u
        if run.ema is not None and run.ema.last_beta is not None:
            m["ema_beta"] = run.ema.last_beta
        self.logger.log(run.step, run.images, m)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", pos=f"{pos:.4f}", neg=f"{neg:.4f}", lam=f"{m['lam']:.3g}",
                                 ips=f"{ips:.0f}", refresh=False)
        self.metrics, self.window = m, Window()

    def save(self, reason: str) -> None:
        """Write a checkpoint (collective: every rank calls it; rank 0 writes)."""
        run = self.run
        state = run.snapshot(reason)
        if state is not None:
            run.last_checkpoint = run.folder.save_checkpoint(
                run.step, run.raw.state_dict(), state.to_checkpoint(),
                ema=run.ema.state_dict() if run.ema is not None else None, keep_last=run.cfg.train.keep_last)
            self.logger.event(run.step, run.images, "checkpoint", path=str(run.last_checkpoint), reason=reason)
        run.last_saved_step = run.step
        barrier()

    def checkpoint_if_due(self) -> None:
        if self.run.step % self.run.cfg.train.ckpt_every == 0:
            self.save("periodic")

    def interrupted(self) -> None:
        """A signal asked to stop: checkpoint, say how to continue."""
        run = self.run
        self.status = "interrupted"
        if run.last_saved_step != run.step:  # else the checkpoint of this step is on disk already
            self.save("signal")
        self._close_bar()
        run.say(f"\ninterrupted by signal at step {run.step}: checkpoint {run.last_checkpoint}; "
                "continue with --resume auto")
        self.logger.event(run.step, run.images, "interrupted")

    def finish(self) -> None:
        """The run reached its length: final checkpoint (unless just written) and sample grid."""
        run = self.run
        if run.last_saved_step != run.step:
            self.save("final")
        self._close_bar()
        if run.cfg.sample.every >= 0:
            self.grid = sample_grid(run)
        self.logger.event(run.step, run.images, "done")

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def close(self) -> None:
        self._close_bar()
        self.logger.close()


def sample_grid(run: Run) -> Path | None:
    """Rank 0 writes ``samples/step_XXXXXXXX.png`` from the EMA model, with the objective's bias correction
    where ``sample.bias_correction`` puts it (off / always / guidance). Latent samples are decoded with the
    data's VAE (:func:`deltafm.vae.decoding.find_decoder`); without one the grid is skipped, said once."""
    info = run.info
    if not run.di.is_main:
        return None
    decoder = None
    if info.kind == "latents":
        decoder = _grid_decoder(run)
        if decoder is None:
            return None
    import numpy as np

    from deltafm.correction import correction_window
    from deltafm.generate import generate, labels_for
    from deltafm.images import save_grid
    from deltafm.pixels import to_uint8_nhwc

    net = run.ema.module if run.ema is not None else run.raw
    was_training = net.training
    net.eval()
    s = run.cfg.sample
    correction = None
    if run.objective.mean_target.initialized:
        window = correction_window(s.bias_correction, s.interval)
        correction = run.objective.sampling_correction("to_fm", run.images, interval=window)
    titles = None
    if run.conditions is not None:
        labels, titles = run.conditions.for_grid(run.dataset, s.num)
    else:
        labels = labels_for(s.num, info.num_classes)
    x = generate(net, labels=labels, shape=(info.channels, info.image_size, info.image_size),
                 num_classes=info.num_classes, solver=s.solver, steps=s.steps,
                 cfg=_guidance(run), interval=s.interval,
                 correction=correction, seed=s.seed, batch_size=s.batch_size, device=run.di.device,
                 path=run.objective.path)
    net.train(was_training)
    if decoder is not None:
        from deltafm.vae.decoding import decode_uint8

        images = decode_uint8(decoder, x)
    else:
        images = to_uint8_nhwc(x)
    name = f"samples/step_{run.step:08d}.png"
    if titles is not None:  # prompts as titles, so a person can check the samples against them
        from deltafm.data.shapes_grid import save_captioned_grid

        chw = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
        return run.folder.write_file(name, lambda tmp: save_captioned_grid(chw, titles, tmp, ncol_limit(s.num)))
    ncol = min(info.num_classes, s.num)
    return run.folder.write_file(name, lambda tmp: save_grid(images, tmp, ncol=ncol))


def ncol_limit(n: int) -> int:
    """Columns of a captioned grid of n samples (about square, at most 8)."""
    return max(1, min(8, int(round(n ** 0.5))))


def _guidance(run: Run) -> float | dict[str, float]:
    """The CFG of sample grids: per-part weights (conditioning.guidance; the run's other parts sample.cfg)
    or the one scale."""
    from .conditions import part_weights

    cfg = run.cfg
    if run.conditions is None or run.conditions.kind != "multi":
        return cfg.sample.cfg
    return part_weights(run.conditions.values, cfg.conditioning.guidance, cfg.sample.cfg)


_GRID_NOTES: set[str] = set()


def _grid_decoder(run: Run):
    """The VAE for latent grids, or None (said once per run folder): :func:`deltafm.vae.decoding.find_decoder`."""
    from deltafm.vae import AutoencoderError
    from deltafm.vae.decoding import find_decoder

    info = run.info
    try:
        decoder, why = find_decoder(info.vae_source, info.vae_identity, run.cfg.sample.vae, run.di.device)
    except AutoencoderError as e:
        decoder, why = None, str(e)
    if decoder is None and str(run.out_dir) not in _GRID_NOTES:
        _GRID_NOTES.add(str(run.out_dir))
        run.say(f"note: no sample grids for these latents: {why}")
    return decoder


def _repa_text(cfg) -> str:
    r = cfg.repa
    if not r.enabled:
        return ""
    return (f"REPA on block {r.encoder_depth} (coeff {r.proj_coeff}) to "
            f"{', '.join([*(f'features.{n}' for n in r.features), *r.encoders])}; ")
