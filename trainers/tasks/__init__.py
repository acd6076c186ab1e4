"""The task registry: name -> `Task` (trainers/tasks/task.py). A dataset of a mixture names the task that reads
it (`datasets.NAME.task`); the train loop runs every task the same way."""

from schemas.errors import ContractError
from trainers.tasks import classification, tubelets, video_classification

TASKS = {task.name: task for task in (classification.TASK, tubelets.TASK, video_classification.TASK)}


def get_task(name: str, key: str = "task"):
  """The task called `name`; `key` is the config key that named it, for the error."""
  if not isinstance(name, str) or name not in TASKS:
    raise ContractError(f"{key}: unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
  return TASKS[name]
