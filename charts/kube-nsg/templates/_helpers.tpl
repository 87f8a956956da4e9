{{- define "kube-nsg.labels" -}}
app.kubernetes.io/name: kube-nsg
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- /* The labels that select one component's pods: (dict "root" $ "component" "agent"). */ -}}
{{- define "kube-nsg.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "kube-nsg.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "kube-nsg.virtualNetwork" -}}
{{- if .Values.virtualNetwork }}
- --virtual-network={{ join "," .Values.virtualNetwork }}
{{- end }}
{{- end }}
