# Sourced by study.sh and accuracy.sh. require_rows WHO N: stop with one line unless AGNEWS_DIR's
# train.csv has at least N lines (the presets and stages meant for the 67,296-row folder).
require_rows() {
  local who=$1 least=$2 file=${AGNEWS_DIR:-data/ag_news}/train.csv rows
  rows=$( { wc -l < "$file"; } 2>/dev/null || echo 0)
  if [ "$rows" -lt "$least" ]; then
    echo "$who: $file has $rows lines; set AGNEWS_DIR to the 67,296-row folder" \
         "(../shared/data/ag_news_67k)" >&2
    exit 2
  fi
}
