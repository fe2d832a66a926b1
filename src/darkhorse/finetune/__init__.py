"""LoRA fine-tuning on a frozen base with the one trainer; adapters saved in PEFT's layout.

`lora` (the LoRA modules, applied from outside), `peft_format` (the adapter files), `chat_data`
(data in the base's own chat template), `run` (`finetune()` and the trainer hooks).
"""
