"""The offline trainer: text file -> batches -> model -> checkpoint in the model store."""
