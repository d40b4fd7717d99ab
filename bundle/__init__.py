"""mcref: microcalcification segmentation with generative refinement, as a MONAI bundle.

Modules, one per concern: ``data`` (readers, transforms, breast mask), ``phantom``
(synthetic FFDM), ``networks``, ``inferers`` (sliding window, refinement), ``refine``
(signal-processing baselines, generative refinement), ``metrics`` (metrics and ignite
handlers), ``reports`` (pictures, tables), ``engine`` (batch inference runner).
"""

__version__ = "0.1.0"
