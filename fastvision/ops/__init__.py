"""fastvision.ops: fused, autograd-capable ops and the layers built on them."""

from .mamba import Mamba, RMSNorm
from .selective_scan import bi_selective_scan, scan_chunk_len, selective_scan

__all__ = ["selective_scan", "bi_selective_scan", "scan_chunk_len", "Mamba", "RMSNorm"]
