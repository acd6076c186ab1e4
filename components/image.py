"""The project image every component runs in (built from infra/Dockerfile), and the decorator that puts a
component in it. Override the image for your registry with $PATCHFLOW_IMAGE or a runtime target."""

import os

from kfp import dsl

PROJECT_IMAGE = os.environ.get("PATCHFLOW_IMAGE", "ghcr.io/patchflow/patchflow:0.1.0")

# install_kfp_package=False: the project image already has kfp, and nothing may reach the network at run time.
component = dsl.component(base_image=PROJECT_IMAGE, install_kfp_package=False)
