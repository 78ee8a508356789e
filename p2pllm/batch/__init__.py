"""`p2pllm batch`: every document of a folder x every prompt template, through a gateway.

`documents` finds and reads the files and cuts long ones into pieces, `prompts` has the templates
and presets, `journal` the append-only record that makes a batch resumable, `runner` sends the
requests (a semaphore for --max-concurrent, retries, the progress line) and `cli` is the command.
The runner only speaks OpenAI's HTTP API, so a batch runs from any machine that reaches a gateway.
"""
