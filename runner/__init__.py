"""The runner: the `patchflow` command, local runs on kfp.local, the run history, the UI and submission to
Vertex AI / Kubeflow. It runs the DAGs that pipelines/ defines and never defines one itself."""
