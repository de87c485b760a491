"""Voice Studio on Ray Serve (``python app.py --ray [ADDRESS]``): Whisper and image work in Serve
deployments whose replicas each build the app's own services, the Gradio app a thin front end.

- :mod:`~pipelines.serve.flags`: the ``--ray*`` flags (standard library only: ``--help`` stays instant);
- :mod:`~pipelines.serve.cluster`: start a local Ray instance or join a cluster, deploy the two Serve
  applications (flags over a Serve config file), their state for ``/status``;
- :mod:`~pipelines.serve.deployments` and :mod:`~pipelines.serve.replica`: the replica side (one
  :class:`~pipelines.services.Services` and one model pool per replica; each call streams progress
  and can be cancelled);
- :mod:`~pipelines.serve.client` and :mod:`~pipelines.serve.remote`: the front-end side, clients with
  the methods the UI calls on the embedded services (retry once when a replica dies);
- :mod:`~pipelines.serve.frontend`: :class:`~pipelines.serve.frontend.RayServices`, what the UI gets;
- :mod:`~pipelines.serve.protocol`: what travels between the two.

Nothing here is imported in embedded mode.
"""
