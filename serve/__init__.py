"""Serve teacher and student agents over HTTP with Ray Serve: an OpenAI-style chat API and a ReAct agent step.

`serve.app.build_app(args)` builds the application (one deployment per model behind one ingress); `python -m serve`
and `serve run serve/example.yaml` start it. Nothing in `sad_ray/` imports this package.
"""
