"""The demo model's trainer, outside the installed package: the task's data (`data`), its
tokenizer (`vocab`), training (`train`: `python -m demo.train`) and evaluation (`evaluate`).
Needs the test extras (torch, transformers) and llama-cpp-python. The trained model ships in
the package: `mlxqwen.demo`."""
