//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
