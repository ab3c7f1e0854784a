"""The coordinator: TF-MOT pruning in rounds, validation, streaming FedAvg, the round loop, the run
directory, the embedded broker and the demo. Modules import TensorFlow; the command-line parsers do
not, so ``--help`` and bad flags answer at once."""
