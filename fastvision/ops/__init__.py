"""fastvision.ops: fused, autograd-capable ops and the layers built on them."""

from .selective_scan_layers import Mamba, RMSNorm
from .selective_scan import bi_selective_scan, scan_chunk_len, selective_scan

__all__ = ["selective_scan", "bi_selective_scan", "scan_chunk_len", "Mamba", "RMSNorm"]

from .neighborhood import na1d, na2d, na3d

__all__ += ["na1d", "na2d", "na3d"]

from .neighborhood_layers import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

__all__ += ["NeighborhoodAttention1D", "NeighborhoodAttention2D", "NeighborhoodAttention3D"]

from .criss_cross import criss_cross_attention

__all__ += ["criss_cross_attention"]

from .criss_cross_layers import CrissCrossAttention, RCCAModule

__all__ += ["CrissCrossAttention", "RCCAModule"]

from .super_token import super_token_sampling, super_token_upsample

__all__ += ["super_token_sampling", "super_token_upsample"]

from .super_token_layers import StokenAttention

__all__ += ["StokenAttention"]

from .deform_conv import deform_conv2d

__all__ += ["deform_conv2d"]

from .deform_conv_layers import DeformConv2d

__all__ += ["DeformConv2d"]

from .dcn import dcn_aggregate, dcnv4

__all__ += ["dcn_aggregate", "dcnv4"]

from .dcn_layers import DCNv3, DCNv4

__all__ += ["DCNv3", "DCNv4"]

from .deform_attn import ms_deform_attn

__all__ += ["ms_deform_attn"]

from .deform_attn_layers import MSDeformAttn

__all__ += ["MSDeformAttn"]
