"""mcref MONAI Deploy application: the bundle's two-stage pipeline on DICOM mammograms; the refined
microcalcification mask as a DICOM SEG, the refined probability as a FRACTIONAL SEG and the
virtual normal image as a derived image.

Entry point: ``python -m deploy.mcref_app -i IN -o OUT [--bundle PATH]`` (see ``docs/deploy.md``).
The SDK (``monai-deploy-app-sdk``) is imported only by :mod:`deploy.mcref_app.app` and
:mod:`deploy.mcref_app.operators`; ``bundle_io``, ``pipeline``, ``writer``, ``inputs``, ``cases``
and ``dicom_out`` work without it.
"""

__all__ = ["MCRefApp", "main"]


def __getattr__(name: str):  # lazy: importing the package must not pull in the SDK
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
