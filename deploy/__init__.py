"""Deployment of the mcref bundle: the MONAI Deploy application lives in :mod:`deploy.mcref_app`."""
