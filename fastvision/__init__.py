"""fastvision: fused PyTorch kernels for vision models.

``import fastvision.ops`` gives the ops and layers; ``fastvision.models`` the
model builders; ``fastvision.reference`` the pure-PyTorch oracles.
"""

__version__ = "0.1.0"
