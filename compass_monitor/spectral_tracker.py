"""Spectral diagnostics of the monitored matrices at their own cadence (paper Sec. 4.1, Cor. 3.5).

They need whole matrices: on one rank each matrix is read where it lives; on
several, each is gathered to rank 0 in turn (2 bytes per weight, only on
spectral snapshots; the masks never gather weights) and measured there against
its base decomposition, which rank 0 computed once the same way. A failure of
one matrix (a non-finite base, a failed decomposition) stores NaN for it and is
logged: it never stops the monitor, and never leaves other ranks in a gather.

Each spectral snapshot gives a :class:`SpectralRows`: the scalar fields of
``metrics/spectral`` and, for a figure like the paper's Fig. 4, all k principal
angles and the top-k singular values of W0 and W_t (``store.spectral_arrays``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .config import MonitorConfig
from .probe import ShardProbe
from .spectral import SpectralBase, SpectralConfig, SpectralDrift, spectral_base, spectral_drift_checked
from .store import schema

__all__ = ["SpectralRows", "SpectralTracker", "spectral_row"]

log = logging.getLogger(__name__)


def spectral_row(drift: SpectralDrift) -> torch.Tensor:
    """A matrix's stored spectral diagnostics, float64 in ``schema.SPECTRAL_FIELDS`` order (on its device)."""
    return torch.stack([getattr(drift, name) for name in schema.SPECTRAL_FIELDS]).double()


@dataclass(frozen=True)
class SpectralRows:
    """One spectral snapshot's diagnostics of every matrix, float64 host arrays, NaN where not computed.

    K is the run's ``spectral_k``; a matrix's own k = min(K, m, n), columns past it are NaN.

    Attributes:
        fields: (P, len(SPECTRAL_FIELDS)), ``metrics/spectral``'s row.
        angles: (P, 2, K) principal angles in degrees, descending; axis 1 left, right (Sec. 4.1).
        singular_values: (P, K) top-K singular values of W_t, descending.
        base_singular_values: (P, K) top-K singular values of W0, descending.
    """

    fields: np.ndarray
    angles: np.ndarray
    singular_values: np.ndarray
    base_singular_values: np.ndarray

    def record_fields(self) -> dict[str, np.ndarray]:
        """The ``store.SnapshotRecord`` keyword arguments that carry these rows."""
        return {
            "spectral": self.fields,
            "spectral_angles": self.angles,
            "spectral_sv": self.singular_values,
            "spectral_sv_base": self.base_singular_values,
        }


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
        self.k = config.spectral_k
        self.bases: list[SpectralBase | None] = []
        #: (P, K) top-K singular values of W0 on the writer rank (NaN where its base failed or past its k).
        self.base_sv = np.full((len(probe.specs), self.k), np.nan)
        with torch.no_grad():
            for p, spec in enumerate(probe.specs):
                w0 = probe.whole_matrix(p, base=True)
                base = None if w0 is None else self._guard(spectral_base, spec, w0, self.config)
                self.bases.append(base)
                if base is not None:
                    self.base_sv[p, : base.k] = base.sigma0[: base.k].cpu().numpy()

    def due(self, snapshots_taken: int) -> bool:
        """Whether the ``snapshots_taken``-th stored snapshot (counting it) gets spectral diagnostics.

        Counts stored snapshots, so a resumed run computes them at the same snapshots
        as an uninterrupted one.
        """
        return snapshots_taken % self.every == 0

    @torch.no_grad()
    def rows(self) -> SpectralRows:
        """This snapshot's :class:`SpectralRows` on every rank (NaN where a matrix failed). A collective.

        Rank 0 computes them; one all-reduce of P x (F + 4K) float64 shares them, so
        that every rank's loggers report the same scalars.
        """
        count, fields, k = len(self.bases), len(schema.SPECTRAL_FIELDS), self.k
        out = np.full((count, fields), np.nan)
        angles = np.full((count, 2, k), np.nan)
        sv = np.full((count, k), np.nan)
        for p, spec in enumerate(self.probe.specs):
            current = self.probe.whole_matrix(p, base=False)
            base = self.bases[p]
            if current is None or base is None:
                continue
            # "perturb" flags drift beyond its validity; those matrices are redone exactly.
            drift = self._guard(spectral_drift_checked, spec, base, current)
            if drift is not None:
                out[p] = spectral_row(drift).cpu().numpy()
                angles[p, 0, : drift.k] = drift.angles_left_deg.cpu().numpy()
                angles[p, 1, : drift.k] = drift.angles_right_deg.cpu().numpy()
                sv[p, : drift.k] = drift.singular_values.cpu().numpy()
        # One flat float64 block; + 0.0 turns -0.0 into +0.0 as the all-reduce below would,
        # so one process and several store the same bits.
        flat = np.concatenate([out.ravel(), angles.ravel(), sv.ravel(), self.base_sv.ravel()]) + 0.0
        if self.probe.comm.world_size > 1:
            shared = torch.from_numpy(flat if self.probe.is_writer else np.zeros_like(flat))
            flat = self.probe.comm.all_reduce(shared).numpy()  # NaN + 0 stays NaN
        ends = np.cumsum([out.size, angles.size, sv.size])
        parts = np.split(flat, ends)
        return SpectralRows(
            fields=parts[0].reshape(out.shape),
            angles=parts[1].reshape(angles.shape),
            singular_values=parts[2].reshape(sv.shape),
            base_singular_values=parts[3].reshape(sv.shape),
        )

    @staticmethod
    def _guard(function: Any, spec: Any, *args: Any) -> Any:
        try:
            return function(*args)
        except Exception as exc:  # one matrix's failure is its NaN, never the monitor's end
            log.warning("compass-monitor: spectral diagnostics of %s failed (%s: %s); stored as NaN", spec.name, type(exc).__name__, exc)
            return None
