# Sourced by the tools/device_*.sh scripts on the GPU host. It unpacks the carried Debian libraries
# (../shared/device/pack-deps.sh makes .devdeps; DEVDEPS names another folder; ../.devdeps is tried
# for scripts run from a subfolder) and puts them on the search paths. It points their pkg-config
# files at /opt/devdeps: they name /usr, where the host has none of them, and CMake's imported
# targets check that the include directories exist. It also puts CUDA's tools on PATH. Running it
# twice on one machine is harmless.
_device_deps="${DEVDEPS:-.devdeps}"
[[ -f $_device_deps/env.sh ]] || _device_deps=../.devdeps
source "$_device_deps/env.sh"
sed -i -e 's#=/usr$#=/opt/devdeps/usr#' -e 's#=/usr/#=/opt/devdeps/usr/#' \
       -e 's#-I/usr/#-I/opt/devdeps/usr/#' -e 's#-L/usr/#-L/opt/devdeps/usr/#' $(find /opt/devdeps -name '*.pc')
export PATH=/usr/local/cuda/bin:$PATH
unset _device_deps
