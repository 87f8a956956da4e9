{{- define "kube-nsg.labels" -}}
app.kubernetes.io/name: kube-nsg
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- define "kube-nsg.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "kube-nsg.virtualNetwork" -}}
{{- if .Values.virtualNetwork }}
- --virtual-network={{ join "," .Values.virtualNetwork }}
{{- end }}
{{- end }}
