"""Multi-agent debate and multi-agent fine-tuning on arithmetic (recipe debate-arith): see agents/debate/loop.py."""
