//go:build tools

// Package tools pins the helm command that scripts/cluster/build.sh builds.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
