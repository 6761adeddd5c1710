"""The run store's spectral arrays: their attributes, the rows written, the typed view read (paper Sec. 4.1, Fig. 4).

``metrics/spectral`` (T, P, 4) holds the scalar diagnostics (``schema.SPECTRAL_FIELDS``).
Beside it, when spectral diagnostics are on, three arrays hold what a figure like
the paper's Fig. 4 draws for one layer: every principal angle between the top-K
singular subspaces of W_0 and W_t, and the top-K singular values of both:

* ``metrics/spectral_angles`` (T, P, 2, K) float64, degrees, descending; axis 2 is
  ``schema.SPECTRAL_SIDES`` (left U, right V);
* ``metrics/spectral_sv`` (T, P, K) float64, top-K singular values of W_t, descending;
* ``metrics/spectral_sv_base`` (T, P, K) float64, the same of W_0 (repeated on every
  spectral snapshot, so that each row is complete on its own and a resume trims it
  like every other array).

K is the run's ``spectral_k``; a matrix's own k = min(K, m, n), columns past it are
NaN, as are rows of snapshots without spectral diagnostics and matrices whose
diagnostics failed. Numpy and zarr only: no torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import schema

__all__ = ["SpectralDetail", "spectral_attributes", "spectral_detail_k", "fit_spectral_row", "read_spectral_detail"]

log = logging.getLogger(__name__)
_warned: set[str] = set()

_FILL = "NaN where not computed (not a spectral snapshot, spectral off, or the matrix's diagnostics failed)"
_PAD = "NaN past a matrix's own k = min(K, m, n)"


def spectral_detail_k(attributes: dict[str, Any]) -> int:
    """K of the detail arrays a new store gets: the config's ``spectral_k`` if ``spectral_every`` > 0, else 0 (none).

    Args:
        attributes: the store's root attributes (``config`` is ``MonitorConfig.to_dict()``).
    """
    config = attributes.get("config") or {}
    every, k = config.get("spectral_every", 0), config.get("spectral_k", 0)
    if not isinstance(every, int) or not isinstance(k, int) or every <= 0 or k <= 0:
        return 0
    return k


def spectral_attributes(name: str = schema.SPECTRAL, k: int | None = None) -> dict[str, Any]:
    """The zarr attributes of a spectral array: named axes, columns and units, so that a plain-zarr reader needs no source."""
    if name == schema.SPECTRAL:
        return {
            "axes": ["snapshot", "param", "field"],
            "columns": list(schema.SPECTRAL_FIELDS),
            "units": list(schema.SPECTRAL_UNITS),
            "fill": _FILL,
            "paper": "Sec. 4.1 (NSS, principal angles), Cor. 3.5 (top-k energy)",
        }
    if name == schema.SPECTRAL_ANGLES:
        return {
            "axes": ["snapshot", "param", "side", "index"],
            "sides": list(schema.SPECTRAL_SIDES),
            "unit": "degree",
            "order": "descending",
            "k": k,
            "fill": f"{_FILL}; {_PAD}",
            "meaning": "principal angles between the top-k singular subspaces of W_0 and W_t, cos(theta_i) = sigma_i(U_0k^T U_tk)",
            "paper": "Sec. 4.1, Fig. 4",
        }
    if name in (schema.SPECTRAL_SV, schema.SPECTRAL_SV_BASE):
        which = "W_t" if name == schema.SPECTRAL_SV else "W_0 (the same on every spectral snapshot)"
        return {
            "axes": ["snapshot", "param", "index"],
            "unit": "weight",
            "order": "descending",
            "k": k,
            "fill": f"{_FILL}; {_PAD}",
            "meaning": f"top-k singular values of {which}, bf16-rounded weights",
            "paper": "Sec. 4.1, Fig. 4",
        }
    raise KeyError(f"{name!r} is not a spectral array")


def fit_spectral_row(value: np.ndarray | None, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One snapshot's row of a detail array as stored: float64 of ``shape``, NaN for None.

    A row with another K than the store's (a resumed run given another ``spectral_k``)
    is cut or NaN-padded along its last axis, with one warning per array.
    """
    out = np.full(shape, np.nan)
    if value is None:
        return out
    row = np.asarray(value, dtype=np.float64)
    if row.shape[:-1] != tuple(shape[:-1]):
        raise schema.StoreError(f"{name}: a row of shape {row.shape}, the store expects {tuple(shape)}")
    k = min(row.shape[-1], shape[-1])
    if row.shape[-1] != shape[-1] and name not in _warned:
        _warned.add(name)
        log.warning("compass-monitor: %s holds K=%d values per matrix, this run computes %d; storing the first %d", name, shape[-1], row.shape[-1], k)
    out[..., :k] = row[..., :k]
    return out


@dataclass(frozen=True)
class SpectralDetail:
    """The spectra of one matrix over the snapshots that have them (a Fig. 4 of one layer).

    Attributes:
        steps: (S,) int64 optimizer steps of the spectral snapshots.
        angles_left_deg: (S, k) float64 principal angles between the top-k left singular
            subspaces of W_0 and W_t, degrees, descending.
        angles_right_deg: (S, k) the same for the right subspaces.
        singular_values: (S, k) float64 top-k singular values of W_t, descending.
        base_singular_values: (k,) float64 top-k singular values of W_0.
        k: the matrix's own k = min(spectral_k, m, n) (columns past it are not returned).
    """

    steps: np.ndarray
    angles_left_deg: np.ndarray
    angles_right_deg: np.ndarray
    singular_values: np.ndarray
    base_singular_values: np.ndarray
    k: int


def read_spectral_detail(
    steps: np.ndarray, angles: np.ndarray | None, sv: np.ndarray | None, sv_base: np.ndarray | None, index: int, shape: tuple[int, int]
) -> SpectralDetail | None:
    """Matrix ``index``'s :class:`SpectralDetail` from the three stored series ((T, P, 2, K), (T, P, K), (T, P, K)).

    None when the store lacks the arrays or no snapshot has this matrix's spectra.
    """
    if angles is None or sv is None or sv_base is None:
        return None
    k = min(int(sv.shape[-1]), *shape)
    a, s, s0 = angles[:, index, :, :k], sv[:, index, :k], sv_base[:, index, :k]
    present = np.isfinite(a).any(axis=(1, 2)) | np.isfinite(s).any(axis=1)
    if not present.any():
        return None
    base_rows = s0[present]
    return SpectralDetail(
        steps=np.asarray(steps)[present],
        angles_left_deg=a[present, 0],
        angles_right_deg=a[present, 1],
        singular_values=s[present],
        base_singular_values=base_rows[-1].copy(),
        k=k,
    )
