"""KFP components: thin typed wrappers, one per DAG step. Each body parses its inputs, calls one library
function and writes its outputs; all domain logic lives in beam_jobs/, trainers/ and evaluators/.

Bodies import inside the function because KFP ships each body to its container as standalone source.
"""
