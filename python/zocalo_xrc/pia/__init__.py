"""Per-image analysis: spot finding on detector images.

* :mod:`.finder`: ``SpotFinder`` (DIALS's dispersion rule in the Rust core) and ``Spots``.
* :mod:`.images`: ``open_images`` for Eiger/Odin NeXus files and ``.npy`` arrays.
* :mod:`.resolution`: what Diamond's per-image analysis reports of an image's spots.
* :mod:`.simulate`: a simulated Eiger2 X, its frames and its files.
* :mod:`.plot`: a frame with its spots circled.
"""

from .finder import SpotFinder, Spots

__all__ = ["SpotFinder", "Spots"]
