# A Ray cluster: one head (dashboard and GCS), GPU workers that join it through Consul.

variable "region" {
  type    = string
  default = "global"
}

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "workers" {
  type    = number
  default = 2
}

job "ray" {
  region      = var.region
  datacenters = var.datacenters
  type        = "service"

  group "head" {
    network {
      port "dashboard" {
        static = 8265
      }
      port "gcs" {
        static = 6379
      }
    }

    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = true
    }

    service {
      name     = "ray-head"
      port     = "gcs"
      provider = "consul"

      check {
        type     = "http"
        port     = "dashboard"
        path     = "/"
        interval = "10s"
        timeout  = "3s"
      }
    }

    task "head" {
      driver = "aimodel"

      config {
        engine       = "ray"
        port         = "dashboard"
        # Ray's nodes talk on many ports of their own and advertise their own
        # address: the head and the workers need the node's network (the
        # plugin's allow_host_network = true, see jobs/client.hcl).
        network_mode = "host"
        shm_size     = "8g"
        args         = ["--head", "--port=6379", "--num-gpus=0"]

        readiness {
          path = "/"
        }
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 2000
        memory = 8192
      }
    }
  }

  group "workers" {
    count = var.workers

    volume "hf-cache" {
      type      = "host"
      source    = "hf-cache"
      read_only = true
    }

    restart {
      attempts = 10
      interval = "30m"
      delay    = "20s"
      mode     = "delay"
    }

    task "worker" {
      driver = "aimodel"

      template {
        destination = "local/head.env"
        env         = true
        data        = <<-EOT
        {{ range service "ray-head" }}RAY_HEAD={{ .Address }}:{{ .Port }}{{ end }}
        EOT
      }

      config {
        engine       = "ray"
        network_mode = "host"
        shm_size     = "16g"
        args         = ["--address=${RAY_HEAD}"]
      }

      volume_mount {
        volume      = "hf-cache"
        destination = "/hf-cache"
        read_only   = true
      }

      resources {
        cpu    = 8000
        memory = 65536

        device "nvidia/gpu" {
          count = 1
        }
      }
    }
  }
}
