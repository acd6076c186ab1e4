"""KFP components: thin typed wrappers, one per DAG step, filed by stage (data, train, evaluate, report).

Each body parses its inputs, calls one library function through the local step cache (step_cache.run_cached)
and writes its outputs; all domain logic lives in beam_jobs/, trainers/ and evaluators/. Bodies import inside
the function because KFP ships each body to its container as standalone source.
"""
