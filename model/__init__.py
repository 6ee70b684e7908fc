"""The model worker: a dedicated process serving an OpenAI-compatible API on loopback.

`python -m model serve` loads a base model plus PEFT LoRA adapters, batches
generation continuously on its own thread (`engine`), and speaks the OpenAI
chat-completions subset vLLM speaks (`server`). `client` is the async client
the bot and trainer use; importing it never imports torch.
"""
