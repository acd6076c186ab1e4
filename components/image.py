"""The project image every component runs in (built from infra/Dockerfile); override for your registry."""

import os

PROJECT_IMAGE = os.environ.get("PATCHFLOW_IMAGE", "ghcr.io/patchflow/patchflow:0.1.0")
