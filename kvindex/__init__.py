"""The global KV-cache block index, fed by the engines' ZMQ KV events.

`events.py` decodes vLLM's messages, `subscriber.py` receives them (central or per pod, with
replay), `translate.py` turns them into index calls, `index.py` is the index, and `cache.py` the
one facade the picker uses (tokenize, score, cached prefix, speculative add).
"""
