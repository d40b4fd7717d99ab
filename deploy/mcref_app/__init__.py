"""mcref MONAI Deploy application: microcalcification SEG and probability map for DICOM mammograms.

Entry point: ``python -m deploy.mcref_app -i IN -o OUT [--bundle PATH]`` (see ``docs/deploy.md``).
The SDK (``monai-deploy-app-sdk``) is imported only by :mod:`deploy.mcref_app.app` and
:mod:`deploy.mcref_app.operators`; :mod:`deploy.mcref_app.dicom_out` and
:mod:`deploy.mcref_app.bundle_io` work without it.
"""

__all__ = ["MCRefApp", "main"]


def __getattr__(name: str):  # lazy: importing the package must not pull in the SDK
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
