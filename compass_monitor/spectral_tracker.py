"""Spectral diagnostics of the monitored matrices at their own cadence (paper Sec. 4.1, Cor. 3.5).

They need whole matrices: on one rank each matrix is read where it lives; on
several, each is gathered to rank 0 in turn (2 bytes per weight, only on
spectral snapshots; the masks never gather weights) and measured there against
its base decomposition, which rank 0 computed once the same way. A failure of
one matrix (a non-finite base, a failed decomposition) stores NaN for it and is
logged: it never stops the monitor, and never leaves other ranks in a gather.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from .config import MonitorConfig
from .probe import ShardProbe
from .spectral import SpectralBase, SpectralConfig, SpectralDrift, spectral_base, spectral_drift_checked
from .store import schema

__all__ = ["SpectralTracker", "spectral_row"]

log = logging.getLogger(__name__)


def spectral_row(drift: SpectralDrift) -> torch.Tensor:
    """A matrix's stored spectral diagnostics, float64 in ``schema.SPECTRAL_FIELDS`` order (on its device)."""
    return torch.stack([getattr(drift, name) for name in schema.SPECTRAL_FIELDS]).double()


class SpectralTracker:
    """Base decompositions (once, a collective) and the diagnostics of every ``spectral_every``-th stored snapshot.

    Args:
        probe: the rank's probe, with its base taken.
        config: ``spectral_k``, ``spectral_every``, ``spectral_method`` are used.
    """

    def __init__(self, probe: ShardProbe, config: MonitorConfig) -> None:
        self.probe = probe
        self.every = config.spectral_every
        method = config.spectral_method
        if method == "auto" and probe.comm.world_size > 1:
            # Rank 0 holds every matrix's base here, and "perturb" keeps an n x n basis
            # and a reference to W0 per matrix (for an 8B model ~17 GB + 16 GB).
            method = "exact"
        self.config = SpectralConfig(k=config.spectral_k, every_n_snapshots=config.spectral_every, method=method)
        self.bases: list[SpectralBase | None] = []
        with torch.no_grad():
            for p, spec in enumerate(probe.specs):
                w0 = probe.whole_matrix(p, base=True)
                self.bases.append(None if w0 is None else self._guard(spectral_base, spec, w0, self.config))

    def due(self, snapshots_taken: int) -> bool:
        """Whether the ``snapshots_taken``-th stored snapshot (counting it) gets spectral diagnostics.

        Counts stored snapshots, so a resumed run computes them at the same snapshots
        as an uninterrupted one.
        """
        return snapshots_taken % self.every == 0

    @torch.no_grad()
    def rows(self) -> np.ndarray | None:
        """(P, len(SPECTRAL_FIELDS)) float64 on every rank (NaN where a matrix failed). A collective.

        Rank 0 computes them; one all-reduce of P x F float64 shares them, so that
        every rank's loggers report the same scalars.
        """
        out = np.full((len(self.bases), len(schema.SPECTRAL_FIELDS)), np.nan)
        for p, spec in enumerate(self.probe.specs):
            current = self.probe.whole_matrix(p, base=False)
            base = self.bases[p]
            if current is None or base is None:
                continue
            # "perturb" flags drift beyond its validity; those matrices are redone exactly.
            drift = self._guard(spectral_drift_checked, spec, base, current)
            if drift is not None:
                out[p] = spectral_row(drift).cpu().numpy()
        if self.probe.comm.world_size > 1:
            shared = torch.from_numpy(out if self.probe.is_writer else np.zeros_like(out))
            out = self.probe.comm.all_reduce(shared).numpy()  # NaN + 0 stays NaN
        return out

    @staticmethod
    def _guard(function: Any, spec: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # one matrix's failure is its NaN, never the monitor's end
            log.warning("compass-monitor: spectral diagnostics of %s failed (%s: %s); stored as NaN", spec.name, type(exc).__name__, exc)
            return None
