"""Data preparation stages: converting public training sets into embedrl pairs (:mod:`~embedrl.prep.convert`) and
annotating them with teacher T-CoTs and relevance judgements (:mod:`~embedrl.prep.annotate`)."""
