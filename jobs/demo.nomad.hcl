# The demo job: one vLLM-style model server on the aimodel driver. `scripts/demo`
# runs it through the Nomad-client simulator with the engine image swapped for
# the local stand-in (this machine has no registry and no GPU).
variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "model" {
  type    = string
  default = "aimodel-demo/tiny-chat"
}

job "demo-llm" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "llm" {
    network {
      port "http" {}
    }

    task "server" {
      driver = "aimodel"

      config {
        engine            = "vllm"
        model             = var.model
        served_model_name = "tiny-chat"
        port              = "http"
        offline           = true

        readiness {
          path     = "/health"
          interval = "500ms"
        }
      }

      env {
        STANDIN_HEALTH_DELAY_MS = "1500"
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
