"""Training steps that stages run: models the pipeline fits before it uses them (SASRec)."""
