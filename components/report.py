"""Report steps: one run's report.html (`report`) and a calibration study's (`study_report`)."""

from typing import List

from kfp.dsl import HTML, Dataset, Input, Model, Output

from components.image import component


@component
def report(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Input[Dataset],
           calibration: Input[Dataset], report: Output[HTML]):
  from components.step_cache import run_cached

  def work():
    from evaluators.report import render_report
    return render_report(shards.path, checkpoint.path, evaluation.path, report.path, calibration.path)
  summary = run_cached("report", ("evaluators", "schemas"), {},
                       {"shards": shards.path, "checkpoint": checkpoint.path, "evaluation": evaluation.path,
                        "calibration": calibration.path}, {"report": report.path}, work)
  report.metadata.update(summary)


@component
def study_report(evaluations: Input[List[Dataset]], report: Output[HTML]):
  from components.step_cache import run_cached

  def work():
    from evaluators.study import render_study_report
    return render_study_report([e.path for e in evaluations], report.path)
  rows = run_cached("study_report", ("evaluators", "schemas"), {},
                    {f"evaluation-{i}": e.path for i, e in enumerate(evaluations)}, {"report": report.path}, work)
  report.metadata.update({"rows": len(rows)})


@component
def localisation_report(shards: Input[Dataset], checkpoint: Input[Model], evaluation: Input[Dataset],
                        report: Output[HTML]):
  from components.step_cache import run_cached

  def work():
    from evaluators.tubelets import render_localisation_report
    return render_localisation_report(shards.path, evaluation.path, report.path, train_dir=checkpoint.path)
  summary = run_cached("localisation_report", ("evaluators", "schemas"), {},
                       {"shards": shards.path, "checkpoint": checkpoint.path, "evaluation": evaluation.path},
                       {"report": report.path}, work)
  report.metadata.update(summary)
