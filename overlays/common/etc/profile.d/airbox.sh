# Added by airbox-build's common overlay
export AIRBOX_BUNDLE=1
